-- 0005: a gang that cannot form on the fleet fails by itself instead of being retried forever. Counts the gang's
-- formation deadlines missed in a row while fewer live workers that could hold one of its ranks were registered
-- than it has ranks; at --gang_unformable_after of them the job fails (class unschedulable). Reset when the gang
-- is granted or a deadline passes with enough such workers. docs/control-plane.md, "Gangs". Forward-only.
ALTER TABLE jobs ADD COLUMN gang_form_misses INT NOT NULL DEFAULT 0;
