-- Handlers asked to stop (timeout, cancel) whose code still runs, as of the
-- worker's last heartbeat: `conveyor status` and the dashboard show them.
ALTER TABLE workers ADD COLUMN stuck_jobs integer NOT NULL DEFAULT 0;
