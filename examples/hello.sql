-- A first workflow: make a table, fill it in two parallel branches, wait a second,
-- then summarise. Each step is checkpointed; kill the worker mid-way and start it again,
-- and every INSERT still happens exactly once.
SELECT df.start(
    'CREATE TABLE IF NOT EXISTS hello (who text, at timestamptz DEFAULT now())'
    ~> (   'INSERT INTO hello (who) VALUES (''left branch'')'
         & 'INSERT INTO hello (who) VALUES (''right branch'')')
    ~> df.sleep(1)
    ~> 'SELECT count(*) AS greetings, string_agg(who, '', '' ORDER BY who) AS who FROM hello',
    'hello');
