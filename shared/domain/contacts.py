"""Contacts and tags: one at a time, or imported by the hundred thousand in one transaction."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from psycopg.types.json import Jsonb
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
)
from sqlalchemy import Select, delete, func, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from shared.db.models import Account, Channel, Contact, ContactTag, Tag
from shared.db.sql import in_ids, owned
from shared.domain import zones
from shared.domain.channels import normalize_address
from shared.domain.errors import FieldError, NotFound, StateConflict, ValidationFailed, describe
from shared.domain.lifecycle import ChannelKind
from shared.domain.types import (
    Id,
    IsoDatetime,
    OneLine,
    check_one_line,
    json_too_deep,
    one_line_schema,
    tag_key,
    tag_name,
)
from shared.domain.zones import Zone

TagName = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=64),
    AfterValidator(check_one_line),
    one_line_schema(),
]
#: How many row errors one failed import lists before it summarises the rest.
MAX_IMPORT_ERRORS = 100
#: Columns a CSV import understands; ``tags`` holds names separated by ``;``. Custom fields
#: are columns named ``field.<key>`` (``field.city``).
CSV_COLUMNS = (
    "account_id",
    "address",
    "name",
    "tags",
    "opted_out",
    "time_zone",
    "last_inbound_at",
)
#: How far ahead of this server's clock an inbound time may be (the inbox's clock may run a
#: little fast).
INBOUND_SKEW = timedelta(minutes=1)
#: How a CSV column names a custom field.
FIELD_COLUMN = "field."
#: Names a custom field may not take: text fills them in from the contact itself.
BUILTIN_FIELDS = frozenset({"name", "address"})
_FIELD_KEY = re.compile(r"[a-z][a-z0-9_]{0,39}")
#: Most custom fields one contact holds.
MAX_FIELDS = 50


def _field_keys(value: dict[str, str]) -> dict[str, str]:
    for key in value:
        if not _FIELD_KEY.fullmatch(key):
            raise ValueError(
                f"key {key[:60]!r} must be 1 to 40 lower-case letters, digits or _, starting "
                "with a letter (e.g. city, plan_2026)"
            )
        if key in BUILTIN_FIELDS:
            raise ValueError(f"key {key!r} is taken by the contact's own {key}")
    return value


#: A contact's custom fields: ``{"city": "Berlin"}``.
Fields = Annotated[
    dict[str, Annotated[OneLine, Field(max_length=500)]],
    Field(max_length=MAX_FIELDS),
    AfterValidator(_field_keys),
]


#: Changes to a contact's custom fields: a value sets a key, null removes it.
FieldChanges = Annotated[
    dict[str, Annotated[OneLine, Field(max_length=500)] | None],
    Field(max_length=MAX_FIELDS),
    AfterValidator(_field_keys),
]


class Unset:
    """Not given (where None means something: clear it)."""


UNSET = Unset()


class ContactIn(BaseModel):
    """One contact as a client writes it."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    account_id: Id
    address: OneLine = Field(min_length=1, max_length=320)
    name: OneLine = Field(default="", max_length=200)
    tags: list[TagName] = Field(default_factory=list, max_length=50)
    opted_out: bool = False
    time_zone: Zone | None = Field(
        default=None, description="IANA zone, for sending windows in local time."
    )
    fields: Fields = Field(
        default_factory=dict,
        description="Custom fields for personalised text ({{city}}); keys are lower-case "
        "letters, digits and _.",
    )
    last_inbound_at: IsoDatetime | None = Field(
        default=None,
        description="When the contact last wrote in (with offset): its conversation window.",
    )

    @field_validator("last_inbound_at")
    @classmethod
    def _inbound(cls, value: datetime | None) -> datetime | None:
        problem = None if value is None else inbound_problem(value)
        if problem is not None:
            raise ValueError(problem[0])
        return value


_ROWS = TypeAdapter(list[ContactIn])


def ensure_tags(session: Session, workspace_id: int, names: Iterable[str]) -> dict[str, int]:
    """Ids of the named tags, creating the missing ones, keyed by ``tag_key`` of the name
    (names that differ only in case or Unicode form are one tag).
    """
    wanted = {tag_key(n): tag_name(n) for n in names if n.strip()}
    if not wanted:
        return {}
    session.execute(
        insert(Tag)
        .values(
            [{"workspace_id": workspace_id, "name": n, "name_key": k} for k, n in wanted.items()]
        )
        .on_conflict_do_nothing()
    )
    rows = session.execute(
        select(Tag.id, Tag.name_key).where(
            Tag.workspace_id == workspace_id, Tag.name_key.in_(list(wanted))
        )
    ).all()
    return {key: tag_id for tag_id, key in rows}


def create_tag(session: Session, workspace_id: int, name: str) -> Tag:
    """A new tag; a name already taken (ignoring case) is a conflict."""
    key = tag_key(name)
    exists = session.execute(
        select(Tag.id).where(Tag.workspace_id == workspace_id, Tag.name_key == key)
    ).scalar_one_or_none()
    if exists is not None:
        raise StateConflict(f"tag {name!r} already exists (id {exists})")
    tag = Tag(workspace_id=workspace_id, name=tag_name(name), name_key=key)
    session.add(tag)
    session.flush()
    return tag


def rename_tag(session: Session, workspace_id: int, tag_id: int, name: str) -> Tag:
    """Give a tag of the workspace a new name (its contacts and the audiences that name it
    keep it); a name another tag has (ignoring case) is a conflict.
    """
    tag = session.execute(
        select(Tag).where(Tag.workspace_id == workspace_id, Tag.id == tag_id).with_for_update()
    ).scalar_one_or_none()
    if tag is None:
        raise NotFound("tag", tag_id)
    key = tag_key(name)
    taken = session.execute(
        select(Tag.id).where(
            Tag.workspace_id == workspace_id, Tag.name_key == key, Tag.id != tag_id
        )
    ).scalar_one_or_none()
    if taken is not None:
        raise StateConflict(f"tag {tag_name(name)!r} already exists (id {taken})")
    tag.name = tag_name(name)
    tag.name_key = key
    session.flush()
    return tag


def account_kinds(
    session: Session, workspace_id: int, account_ids: Iterable[int]
) -> dict[int, ChannelKind]:
    """Channel kind of each account of the workspace among ``account_ids``."""
    rows = session.execute(
        select(Account.id, Channel.kind)
        .join(Channel, Channel.id == Account.channel_id)
        .where(Account.workspace_id == workspace_id, in_ids(Account.id, account_ids))
    ).all()
    return {account_id: ChannelKind(kind) for account_id, kind in rows}


def create_contact(session: Session, workspace_id: int, data: ContactIn) -> Contact:
    """One new contact; its tags are created by name when missing."""
    kinds = account_kinds(session, workspace_id, [data.account_id])
    if data.account_id not in kinds:
        raise ValidationFailed.one(
            "account_id", f"account {data.account_id} not found", "not_found"
        )
    try:
        address = normalize_address(kinds[data.account_id], data.address)
    except ValueError as exc:
        raise ValidationFailed.one("address", str(exc)) from None
    existing = session.execute(
        select(Contact.id).where(Contact.account_id == data.account_id, Contact.address == address)
    ).scalar_one_or_none()
    if existing is not None:
        raise StateConflict(
            f"account {data.account_id} already has a contact at {address!r} (id {existing})"
        )
    zones.check_known(session, [data.time_zone], "time_zone")
    contact = Contact(
        workspace_id=workspace_id,
        account_id=data.account_id,
        address=address,
        name=data.name,
        opted_out_at=func.now() if data.opted_out else None,
        time_zone=data.time_zone,
        fields=data.fields,
    )
    session.add(contact)
    session.flush()
    set_tags(session, workspace_id, contact.id, data.tags)
    return contact


def set_tags(session: Session, workspace_id: int, contact_id: int, names: Sequence[str]) -> None:
    """Make the contact's tags exactly ``names``."""
    tag_ids = set(ensure_tags(session, workspace_id, names).values())
    current = set(
        session.execute(
            select(ContactTag.tag_id).where(ContactTag.contact_id == contact_id)
        ).scalars()
    )
    if current - tag_ids:
        session.execute(
            delete(ContactTag).where(
                ContactTag.contact_id == contact_id, in_ids(ContactTag.tag_id, current - tag_ids)
            )
        )
    if tag_ids - current:
        session.execute(
            insert(ContactTag).values(
                [
                    {"contact_id": contact_id, "tag_id": t, "workspace_id": workspace_id}
                    for t in tag_ids - current
                ]
            )
        )


def get_contact(session: Session, workspace_id: int, contact_id: int) -> Contact:
    return owned(session, Contact, contact_id, workspace_id, "contact")


def update_contact(
    session: Session,
    workspace_id: int,
    contact_id: int,
    *,
    name: str | None = None,
    tags: Sequence[str] | None = None,
    opted_out: bool | None = None,
    clear_unreachable: bool = False,
    time_zone: str | Unset | None = UNSET,
    fields: dict[str, str | None] | None = None,
    last_inbound_at: datetime | None = None,
) -> Contact:
    """Change a contact's name, tags, opt-out, zone (None clears it) or custom fields (each
    key given is set, or removed when None), or clear its unreachable mark; what is not given
    stays as it is.
    """
    contact = get_contact(session, workspace_id, contact_id)
    values: dict[str, Any] = {}
    if not isinstance(time_zone, Unset):
        zones.check_known(session, [time_zone], "time_zone")
        values["time_zone"] = time_zone
    if last_inbound_at is not None:
        values["last_inbound_at"] = func.greatest(
            Contact.last_inbound_at, _inbound_time(last_inbound_at, "last_inbound_at")
        )
    if fields:
        merged = {k: v for k, v in {**contact.fields, **fields}.items() if v is not None}
        if len(merged) > MAX_FIELDS:
            raise ValidationFailed.one(
                "fields", f"would hold {len(merged)} fields; a contact holds at most {MAX_FIELDS}"
            )
        values["fields"] = merged
    if clear_unreachable:
        values.update(unreachable_at=None, unreachable_reason=None)
    if name is not None:
        values["name"] = name
    if opted_out is not None and opted_out != (contact.opted_out_at is not None):
        values["opted_out_at"] = func.now() if opted_out else None
    if values:
        session.execute(
            update(Contact).where(Contact.id == contact_id).values(**values, updated_at=func.now())
        )
    if tags is not None:
        set_tags(session, workspace_id, contact_id, tags)
    session.refresh(contact)
    return contact


def inbound_problem(at: datetime) -> tuple[str, str] | None:
    """What is wrong with a time a contact wrote in, as (message, type): it needs its
    offset, and may not be ahead of now. None when it is right.
    """
    if at.tzinfo is None:
        return "needs its UTC offset (Z or +01:00)", "timezone_missing"
    if at > datetime.now(UTC) + INBOUND_SKEW:
        return "is in the future", "in_future"
    return None


def _inbound_time(at: datetime, field: str) -> datetime:
    """A time a contact wrote in, or a 422 on ``field`` saying what is wrong with it."""
    problem = inbound_problem(at)
    if problem is not None:
        raise ValidationFailed.one(field, *problem)
    return at


def record_inbound(
    session: Session, workspace_id: int, contact_id: int, at: datetime | None
) -> Contact:
    """The contact wrote in at ``at`` (None: now); an earlier time than the one known is kept
    as it is.
    """
    return update_contact(
        session, workspace_id, contact_id, last_inbound_at=at or datetime.now(UTC)
    )


def tags_of(session: Session, contact_ids: Sequence[int]) -> dict[int, list[str]]:
    """Tag names of each contact, sorted."""
    if not contact_ids:
        return {}
    rows = session.execute(
        select(ContactTag.contact_id, Tag.name)
        .join(Tag, Tag.id == ContactTag.tag_id)
        .where(in_ids(ContactTag.contact_id, contact_ids))
        .order_by(ContactTag.contact_id, Tag.name_key)
    ).all()
    out: dict[int, list[str]] = {cid: [] for cid in contact_ids}
    for contact_id, name in rows:
        out[contact_id].append(name)
    return out


def contacts_query(
    workspace_id: int,
    *,
    account_id: int | None = None,
    tag_id: int | None = None,
    opted_out: bool | None = None,
) -> Select[Contact]:
    """Contacts of a workspace, narrowed by the given filters."""
    query = select(Contact).where(Contact.workspace_id == workspace_id)
    if account_id is not None:
        query = query.where(Contact.account_id == account_id)
    if tag_id is not None:
        query = query.where(
            select(ContactTag.contact_id)
            .where(ContactTag.contact_id == Contact.id, ContactTag.tag_id == tag_id)
            .exists()
        )
    if opted_out is not None:
        query = query.where(
            Contact.opted_out_at.is_not(None) if opted_out else Contact.opted_out_at.is_(None)
        )
    return query


# --- import -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImportResult:
    received: int
    created: int
    updated: int


def parse_import(body: bytes, content_type: str, *, max_rows: int) -> list[ContactIn]:
    """Rows of a JSON array or a CSV file (header line first), all valid, or ``ValidationFailed``
    listing what is wrong row by row.
    """
    media_type = content_type.split(";")[0].strip().lower()
    if media_type in ("text/csv", "application/csv"):
        raw = _csv_rows(body, max_rows)
    elif media_type in ("application/json", ""):
        raw = _json_rows(body, max_rows)
    else:
        raise ValidationFailed.one(
            "Content-Type", f"{media_type!r} is not importable; send application/json or text/csv"
        )
    if not raw:
        raise ValidationFailed.one("body", "holds no contacts", "empty")
    try:
        return _ROWS.validate_python(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        listed = [
            FieldError(_row_field(err["loc"]), describe(err), err["type"])
            for err in errors[:MAX_IMPORT_ERRORS]
        ]
        if len(errors) > MAX_IMPORT_ERRORS:
            listed.append(
                FieldError("body", f"and {len(errors) - MAX_IMPORT_ERRORS} more errors", "more")
            )
        raise ValidationFailed(listed) from None


def _row_field(loc: Sequence[int | str]) -> str:
    index, *rest = loc
    return f"rows[{index}]" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in rest)


def _too_many(max_rows: int) -> ValidationFailed:
    return ValidationFailed.one(
        "body",
        f"holds more than {max_rows:,} contacts; one import takes at most {max_rows:,}",
        "too_long",
    )


def _json_rows(body: bytes, max_rows: int) -> list[Any]:
    """The elements of a JSON array, read one by one: reading stops as soon as there are more
    than ``max_rows``, so an oversized import costs no more than the rows it may hold.
    """
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValidationFailed.one("body", "JSON must be UTF-8 encoded", "encoding") from None
    if json_too_deep(body):
        raise ValidationFailed.one(
            "body", "is nested deeper than a list of contact objects can be", "json_too_deep"
        )
    decoder = json.JSONDecoder()
    at = _skip_space(text, 0)
    if text[at : at + 1] != "[":
        raise ValidationFailed.one(
            "body",
            "is not valid JSON for an import: it must be a JSON array of contacts",
            "list_type",
        )
    at = _skip_space(text, at + 1)
    rows: list[Any] = []
    try:
        if text[at : at + 1] == "]":
            at += 1
        else:
            while True:
                row, at = decoder.raw_decode(text, at)
                rows.append(row)
                if len(rows) > max_rows:
                    raise _too_many(max_rows)
                at = _skip_space(text, at)
                if text[at : at + 1] == ",":
                    at = _skip_space(text, at + 1)
                    continue
                if text[at : at + 1] == "]":
                    at += 1
                    break
                raise json.JSONDecodeError("expected ',' or ']'", text, at)
        if _skip_space(text, at) != len(text):
            raise json.JSONDecodeError("extra data after the array", text, at)
    except (json.JSONDecodeError, RecursionError) as exc:
        where = (
            f" (line {exc.lineno}, column {exc.colno}: {exc.msg})"
            if isinstance(exc, json.JSONDecodeError)
            else ""
        )
        raise ValidationFailed.one("body", f"is not valid JSON{where}", "json_invalid") from None
    return rows


def _skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at] in " \t\r\n":
        at += 1
    return at


def _csv_rows(body: bytes, max_rows: int) -> list[dict[str, Any]]:
    try:
        decoded = body.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValidationFailed.one("body", "CSV must be UTF-8 encoded", "encoding") from None
    reader = csv.DictReader(io.StringIO(decoded, newline=""), strict=True)
    try:
        return _read_csv(reader, max_rows)
    except csv.Error as exc:
        # A quote left open, a cell past the csv module's size limit: the file is malformed.
        raise ValidationFailed.one(
            "body", f"is not a well-formed CSV file (line {reader.line_num}: {exc})", "csv_syntax"
        ) from None


def _read_csv(reader: csv.DictReader[str], max_rows: int) -> list[dict[str, Any]]:
    header = reader.fieldnames or []
    unknown = [c for c in header if c not in CSV_COLUMNS and not c.startswith(FIELD_COLUMN)]
    missing = [c for c in ("account_id", "address") if c not in header]
    if unknown or missing:
        problems = [f"unknown: {', '.join(unknown)}"] if unknown else []
        problems += [f"missing: {', '.join(missing)}"] if missing else []
        raise ValidationFailed.one(
            "body",
            f"CSV header must name columns from {', '.join(CSV_COLUMNS)} or field.<key> for "
            f"a custom field (account_id and address required); {'; '.join(problems)}",
            "csv_header",
        )
    rows: list[dict[str, Any]] = []
    errors: list[FieldError] = []
    for i, record in enumerate(reader):
        if i >= max_rows:
            raise _too_many(max_rows)
        if None in record:
            errors.append(
                FieldError(
                    f"rows[{i}]",
                    f"CSV line {reader.line_num} has more cells than the header",
                    "csv_row",
                )
            )
            continue
        row: dict[str, Any] = {k: v for k, v in record.items() if v is not None}
        if "tags" in row:
            row["tags"] = [t for t in row["tags"].split(";") if t.strip()]
        if row.get("opted_out") == "":
            del row["opted_out"]
        for optional in ("time_zone", "last_inbound_at"):
            if row.get(optional) == "":
                del row[optional]
        custom = {
            k.removeprefix(FIELD_COLUMN): row.pop(k)
            for k in [k for k in row if k.startswith(FIELD_COLUMN)]
        }
        if any(custom.values()):
            row["fields"] = {k: v for k, v in custom.items() if v}
        account_id = row.get("account_id")
        if (
            isinstance(account_id, str)
            and account_id.strip().isascii()
            and account_id.strip().isdigit()
        ):
            row["account_id"] = int(account_id)
        rows.append(row)
    if errors:
        raise ValidationFailed(errors[:MAX_IMPORT_ERRORS])
    return rows


def import_contacts(session: Session, workspace_id: int, rows: list[ContactIn]) -> ImportResult:
    """Write every row or none: new contacts are created, known ones (same account and
    address) get the new name and the extra tags. An import never clears an opt-out.
    """
    kinds = account_kinds(session, workspace_id, {r.account_id for r in rows})
    errors: list[FieldError] = []
    seen: dict[tuple[int, str], int] = {}
    normalized: list[str] = []
    for i, row in enumerate(rows):
        kind = kinds.get(row.account_id)
        if kind is None:
            errors.append(
                FieldError(
                    f"rows[{i}].account_id", f"account {row.account_id} not found", "not_found"
                )
            )
            normalized.append("")
            continue
        try:
            address = normalize_address(kind, row.address)
        except ValueError as exc:
            errors.append(FieldError(f"rows[{i}].address", str(exc)))
            normalized.append("")
            continue
        first = seen.setdefault((row.account_id, address), i)
        if first != i:
            errors.append(
                FieldError(
                    f"rows[{i}].address",
                    f"repeats rows[{first}] (same account and address)",
                    "duplicate",
                )
            )
        normalized.append(address)
        if len(errors) >= MAX_IMPORT_ERRORS:
            break
    if errors:
        raise ValidationFailed(errors)

    zones.check_known(session, {r.time_zone for r in rows}, "rows[].time_zone")
    tag_ids = ensure_tags(session, workspace_id, {t for r in rows for t in r.tags})
    # One import per transaction is the API's case; a second one in the same transaction
    # starts from an empty staging table too.
    session.execute(text("DROP TABLE IF EXISTS pg_temp.contact_import"))
    session.execute(
        text(
            "CREATE TEMP TABLE contact_import (account_id bigint, address text, name text,"
            " opted_out boolean, tag_ids bigint[], time_zone text, fields jsonb,"
            " last_inbound_at timestamptz) ON COMMIT DROP"
        )
    )
    driver = session.connection().connection.driver_connection
    assert driver is not None
    with (
        driver.cursor() as cursor,
        cursor.copy(
            "COPY contact_import (account_id, address, name, opted_out, tag_ids, time_zone,"
            " fields, last_inbound_at) FROM STDIN"
        ) as copy,
    ):
        for row, address in zip(rows, normalized, strict=True):
            copy.write_row(
                (
                    row.account_id,
                    address,
                    row.name,
                    row.opted_out,
                    [tag_ids[tag_key(t)] for t in row.tags],
                    row.time_zone,
                    Jsonb(row.fields),
                    row.last_inbound_at,
                )
            )
    session.execute(text("ANALYZE contact_import"))
    counts = session.execute(
        text(
            """
            WITH upserted AS (
                INSERT INTO contact (workspace_id, account_id, address, name, opted_out_at,
                                     time_zone, fields, last_inbound_at)
                SELECT :workspace_id, account_id, address, name,
                       CASE WHEN opted_out THEN now() END, time_zone, fields, last_inbound_at
                FROM contact_import
                ON CONFLICT (account_id, address) DO UPDATE
                SET name = CASE WHEN EXCLUDED.name <> '' THEN EXCLUDED.name ELSE contact.name END,
                    opted_out_at = COALESCE(contact.opted_out_at, EXCLUDED.opted_out_at),
                    time_zone = COALESCE(EXCLUDED.time_zone, contact.time_zone),
                    fields = contact.fields || EXCLUDED.fields,
                    last_inbound_at = greatest(contact.last_inbound_at, EXCLUDED.last_inbound_at),
                    updated_at = now()
                RETURNING id, account_id, address, (xmax = 0) AS inserted
            ), tagged AS (
                INSERT INTO contact_tag (contact_id, tag_id, workspace_id)
                SELECT u.id, t.tag_id, :workspace_id
                FROM upserted u
                JOIN contact_import i USING (account_id, address)
                CROSS JOIN LATERAL unnest(i.tag_ids) AS t(tag_id)
                ON CONFLICT DO NOTHING
            )
            SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted)
            FROM upserted
            """
        ),
        {"workspace_id": workspace_id},
    ).one()
    return ImportResult(received=len(rows), created=int(counts[0]), updated=int(counts[1]))
