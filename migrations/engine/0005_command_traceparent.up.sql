-- The W3C trace context (traceparent) a command arrived with, so a trace
-- can be followed from the HTTP request to the row that applied it.
-- Rejected and retrying commands keep it in their headers too.
ALTER TABLE loom_commands ADD COLUMN traceparent TEXT;
