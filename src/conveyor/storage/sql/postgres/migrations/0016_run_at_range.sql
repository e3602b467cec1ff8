-- Rows written before the value ranges were enforced could hold a run_at Python
-- cannot represent (0001-01-01T00:00:00+14:00 was stored as a date BC): every
-- fetch or listing that met such a row failed, and the ordinary jobs leased with
-- it were never run. Clamp them into the accepted range (docs/api.md, "Value
-- ranges": 1970-01-01 to 9999-12-30 UTC; an early one stays due at once) and
-- refuse such values from now on, whoever writes them.
UPDATE conveyor.jobs SET run_at = '1970-01-01 00:00:00+00'
 WHERE run_at < '0001-01-02 00:00:00+00';
UPDATE conveyor.jobs SET run_at = '9999-12-30 00:00:00+00'
 WHERE run_at > '9999-12-30 00:00:00+00';
ALTER TABLE conveyor.jobs ADD CONSTRAINT jobs_run_at_range
    CHECK (run_at >= '0001-01-02 00:00:00+00' AND run_at <= '9999-12-30 00:00:00+00');
