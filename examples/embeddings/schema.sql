-- The embedding pipeline's tables, run as the application role (the script creates the
-- vector extension first, as a superuser).
--
-- Each document inserted starts one workflow, from an AFTER INSERT trigger, in the inserting
-- transaction: no document is ever left without its workflow, and a rolled back insert
-- starts none. The workflow
--   1. splits the document into sentences, in SQL, as rows of chunks (named 'chunks');
--   2. embeds each chunk in a Python step (embedding_steps.py), four at a time (df.map), which
--      writes the vector in the same transaction that records the step: exactly once.

CREATE TABLE documents (
    id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    title  text NOT NULL,
    body   text NOT NULL
);

CREATE TABLE chunks (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    document_id  bigint NOT NULL REFERENCES documents (id),
    n            integer NOT NULL,   -- the sentence's place in the document
    body         text NOT NULL,
    embedding    vector(64)          -- NULL until its step ran
);

CREATE FUNCTION embed_new_document() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM df.start(
        df.seq(
            df.as(format($sql$
                INSERT INTO chunks (document_id, n, body)
                SELECT d.id, s.n, trim(s.part)
                  FROM documents d,
                       regexp_split_to_table(d.body, '[.!?]+\s+') WITH ORDINALITY AS s (part, n)
                 WHERE d.id = %s AND trim(s.part) <> ''
                RETURNING id, body$sql$, NEW.id), 'chunks'),
            df.map('chunks',
                   df.call('embeddings.embed_chunk',
                           '{"chunk_id": "$item.id", "text": "$item.body"}'),
                   max_parallel => 4)),
        'embed document ' || NEW.id);
    RETURN NULL;
END;
$$;

CREATE TRIGGER documents_embedded AFTER INSERT ON documents
    FOR EACH ROW EXECUTE FUNCTION embed_new_document();
