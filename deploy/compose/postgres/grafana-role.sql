-- The read-only role Grafana's per-broadcast dashboard reads Postgres with (the data source
-- bcast-postgres; docs/dashboards.md). Run after the migrations, as the tables' owner; safe to
-- run again. Compose runs it in the grafana-role service; elsewhere:
--   psql "$DATABASE_URL" -f deploy/compose/postgres/grafana-role.sql
-- and give the role a password (ALTER ROLE bcast_grafana PASSWORD '...') where logins need one.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'bcast_grafana') THEN
        CREATE ROLE bcast_grafana LOGIN;
    END IF;
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO bcast_grafana', current_database());
END
$$;
GRANT USAGE ON SCHEMA public TO bcast_grafana;
GRANT SELECT ON broadcast, channel, delivery_batch, delivery TO bcast_grafana;
ALTER ROLE bcast_grafana SET default_transaction_read_only = on;
ALTER ROLE bcast_grafana SET statement_timeout = '15s';
