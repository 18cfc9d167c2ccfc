-- HTTP steps, the SQL side: df.http and df.http_multipart.
--
-- They build HTTP / HTTP_MULTIPART nodes exactly as pg_durable does, but never refuse because
-- of the egress policy. In pg_durable that policy is compiled into the extension, so its
-- builders can refuse at build time ("df.http() is disabled. Rebuild with ..."). In pgdurable
-- the operator sets the policy on the worker, which may differ from one deployment to the
-- next and is not visible from SQL; it is enforced when the step runs (docs/http.md). The
-- builders therefore only do the checks that hold everywhere (scheme, method, timeout,
-- multipart parts). Who may use HTTP at all is decided by EXECUTE on these two functions,
-- revoked from PUBLIC, granted by df.grant_usage(role, include_http => true).
--
-- The worker performs the request and checkpoints the response on its own connection: an
-- HTTP step is at-least-once, and carries an Idempotency-Key that is the same for every
-- attempt.

-- ---------------------------------------------------------------------------------------------
-- df.http, df.http_multipart. Not STRICT, because body and headers may be NULL
-- (JSON null in the config), and so may parts, to be refused with pg_durable's message.
--
-- NULL handling. pg_durable leaves open what a NULL does in a parameter that may not be NULL;
-- pgdurable raises, as df.loop does for a NULL body ('df.loop: body cannot be NULL'): an HTTP
-- step without a URL, a method or a time limit is a mistake, and returning NULL would only
-- move the surprise to df.start ('fut cannot be NULL') or, inside an operator, make the whole
-- graph NULL. These checks come first, as argument checks do in pg_durable; a NULL parts is
-- checked with the other parts checks.
-- ---------------------------------------------------------------------------------------------

-- Why url is refused by the scheme check, or NULL. A URL with a '{' is
-- left alone: a {var} may supply its scheme at run time (a $var does not count; its URL fails
-- here, as in pg_durable). The worker checks the final URL again before every request.
CREATE OR REPLACE FUNCTION df._http_scheme_error(url text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT format('Blocked: unsupported URL scheme ''%s''. Only http and https are allowed.',
                  s.scheme)
      FROM (SELECT lower(split_part(url, '://', 1)) AS scheme) AS s
     WHERE strpos(url, '{') = 0 AND s.scheme NOT IN ('http', 'https');
$$;

-- The checks both builders make first, in pg_durable's order, with their messages.
CREATE OR REPLACE FUNCTION df._http_check(
    builder text, url text, method text, timeout_seconds integer)
RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    v_err text;
BEGIN
    IF url IS NULL THEN
        RAISE EXCEPTION '%: url cannot be NULL', builder USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF method IS NULL THEN
        RAISE EXCEPTION '%: method cannot be NULL', builder
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF timeout_seconds IS NULL THEN
        RAISE EXCEPTION '%: timeout_seconds cannot be NULL', builder
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    v_err := df._http_scheme_error(url);
    IF v_err IS NOT NULL THEN
        RAISE EXCEPTION '%', v_err USING ERRCODE = 'invalid_parameter_value';
    END IF;
END;
$$;

CREATE OR REPLACE FUNCTION df.http(
    url text, method text DEFAULT 'POST', body text DEFAULT NULL, headers jsonb DEFAULT NULL,
    timeout_seconds integer DEFAULT 30)
RETURNS text
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_method text := upper(method);
BEGIN
    PERFORM df._http_check('df.http', url, method, timeout_seconds);
    IF v_method NOT IN ('GET', 'POST', 'PUT', 'DELETE', 'PATCH') THEN
        RAISE EXCEPTION 'Invalid HTTP method: %. Must be GET, POST, PUT, DELETE, or PATCH',
            v_method USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF timeout_seconds <= 0 THEN
        RAISE EXCEPTION 'Timeout must be positive' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN df._envelope('HTTP', NULL, NULL, NULL, NULL,
                        '{"url":' || to_json(url)::text
                            || ',"method":' || to_json(v_method)::text
                            || ',"body":' || coalesce(to_json(body)::text, 'null')
                            || ',"headers":' || coalesce(df._jsonb_compact(headers), 'null')
                            || ',"timeout_seconds":' || timeout_seconds::text
                            || '}',
                        NULL);
END;
$$;

-- Parts are objects {name, data_b64[, filename][, content_type]}; like pg_durable, only the
-- list itself is checked here, each part when the request is built.
CREATE OR REPLACE FUNCTION df.http_multipart(
    url text, method text DEFAULT 'POST', parts jsonb DEFAULT NULL, headers jsonb DEFAULT NULL,
    timeout_seconds integer DEFAULT 30)
RETURNS text
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_method text := upper(method);
BEGIN
    PERFORM df._http_check('df.http_multipart', url, method, timeout_seconds);
    IF v_method NOT IN ('POST', 'PUT', 'PATCH') THEN
        RAISE EXCEPTION 'Invalid HTTP method for multipart: %. Must be POST, PUT, or PATCH',
            v_method USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF parts IS NULL THEN
        RAISE EXCEPTION 'parts is required and cannot be NULL'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF jsonb_typeof(parts) <> 'array' THEN
        RAISE EXCEPTION 'parts must be a JSON array of part objects'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF jsonb_array_length(parts) = 0 THEN
        RAISE EXCEPTION 'parts must contain at least one part'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF timeout_seconds <= 0 THEN
        RAISE EXCEPTION 'Timeout must be positive' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN df._envelope('HTTP_MULTIPART', NULL, NULL, NULL, NULL,
                        '{"url":' || to_json(url)::text
                            || ',"method":' || to_json(v_method)::text
                            || ',"parts":' || df._jsonb_compact(parts)
                            || ',"headers":' || coalesce(df._jsonb_compact(headers), 'null')
                            || ',"timeout_seconds":' || timeout_seconds::text
                            || '}',
                        NULL);
END;
$$;

-- Outbound requests are a privilege: df.grant_usage(role, include_http => true) grants
-- EXECUTE on these two (security.sql).
REVOKE EXECUTE ON FUNCTION df.http(text, text, text, jsonb, integer) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION df.http_multipart(text, text, jsonb, jsonb, integer) FROM PUBLIC;
