-- Workers record the advisory lock their listening session holds, so that the leases of a
-- worker that died are given back as soon as its session ends (df._release_dead_workers).
ALTER TABLE df._worker_epoch ADD COLUMN session_lock bigint;
