-- 0004: a gang that does not complete within the formation deadline releases all its pending slots (and is held
-- back as long), so an unformable gang cannot keep its members idle forever. docs/control-plane.md, "Gangs".
ALTER TABLE gang_slots ADD COLUMN joined_at TIMESTAMPTZ NOT NULL DEFAULT now();
