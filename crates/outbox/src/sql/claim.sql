-- The claim (outbox::claim): locks up to $1 free rows and moves those it may publish now to
-- outbox_published, returning them with the number of rows locked.
--
-- A row is free when it is pending and due. A row never attempted is always due: its
-- next_attempt_at defaults to its writer's transaction start, which can be later than this
-- claim's now() even though the row committed before the claim's snapshot.
WITH locked AS (
  SELECT o.id, o.aggregate_id, o.seq
  FROM outbox o
  WHERE o.status = 'pending' AND (o.attempts = 0 OR o.next_attempt_at <= now())
    -- held back: an earlier row of the aggregate is backing off or dead
    AND NOT EXISTS (
      SELECT 1 FROM outbox e
      WHERE e.aggregate_id = o.aggregate_id AND e.seq < o.seq
        AND (e.status <> 'pending' OR e.attempts > 0)
        AND NOT (e.status = 'pending' AND (e.attempts = 0 OR e.next_attempt_at <= now())))
  ORDER BY o.id
  LIMIT $1
  FOR UPDATE SKIP LOCKED
),
accepted AS (
  SELECT id
  FROM (SELECT l.id,
               (SELECT count(*) FROM outbox e
                WHERE e.aggregate_id = l.aggregate_id AND e.seq < l.seq) AS earlier,
               row_number() OVER (PARTITION BY l.aggregate_id ORDER BY l.seq) - 1 AS locked_before
        FROM locked l) c
  WHERE earlier = locked_before
),
moved AS (
  DELETE FROM outbox WHERE id IN (SELECT id FROM accepted)
  RETURNING id, event_id, aggregate_type, aggregate_id, seq, event_type, payload, occurred_at,
            traceparent, tracestate, attempts, created_at, tenant_id
),
published AS (
  INSERT INTO outbox_published (id, event_id, aggregate_type, aggregate_id, seq, event_type, payload,
                                occurred_at, traceparent, tracestate, attempts, created_at, tenant_id)
  SELECT * FROM moved
)
SELECT n.locked, m.id, m.event_id, m.aggregate_type, m.aggregate_id, m.seq, m.event_type,
       m.payload::text AS payload, m.occurred_at, m.traceparent, m.tracestate, m.attempts, m.created_at,
       m.tenant_id
FROM (SELECT count(*) AS locked FROM locked) n
LEFT JOIN moved m ON true
