-- Cron schedules: df.wait_for_schedule and the check of its expression.
--
-- df.wait_for_schedule(cron) builds a WAIT_SCHEDULE node; the expression is checked here, at
-- build time, so a bad schedule never reaches df.start(). The worker computes fire times with
-- pgdurable.core.cron, whose cron_error() accepts exactly what df._cron_error() accepts,
-- with the same messages (tests/test_schedule.py runs one table of cases through both).
--
-- The dialect is standard five-field crontab: `minute hour day-of-month month day-of-week`,
-- minute 0-59, hour 0-23, day-of-month 1-31, month 1-12 or JAN-DEC, day-of-week 0-7 or
-- SUN-SAT (names case-insensitive); each field a comma list of `*`, `N` or `N-M`, each with an
-- optional `/step` (step >= 1; `N/step` means `N-max/step`). Fields are separated by runs of
-- ASCII whitespace. Macros (@hourly, ...) are refused, as in pg_durable.
--
-- DIFFERENT FROM pg_durable ON PURPOSE: day-of-week. pg_durable hands the expression to the
-- Rust `cron` crate, which numbers days 1-7 with 1 = Sunday and refuses 0, so there
-- `0 9 * * 1-5` runs Sunday to Thursday. Here day-of-week is the crontab one: 0-7 with both
-- 0 and 7 Sunday, 1 Monday ... 6 Saturday, so `0 9 * * 1-5` means weekdays, as every cron user
-- expects. Expressions that use names (MON-FRI) mean the same in both.
--
-- When both day-of-month and day-of-week are restricted (anything but a lone `*`), a day
-- matches if either matches (crontab(5), POSIX); otherwise both must. An expression that can
-- never fire because its day-of-month does not occur in its months (`0 0 30 2 *`) is refused.

CREATE OR REPLACE FUNCTION df._cron_value(token text, field integer, OUT value integer, OUT error text)
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
-- One value of a field (1 minute ... 5 day-of-week): value set, or error set, or neither when
-- the token is not a value at all (the caller then reports the whole item).
DECLARE
    names     text[] := ARRAY['minute', 'hour', 'day-of-month', 'month', 'day-of-week'];
    lows      integer[] := ARRAY[0, 0, 1, 1, 0];
    highs     integer[] := ARRAY[59, 23, 31, 12, 7];
    upper_tok text;
    pos       integer;
BEGIN
    IF token ~ '^[0-9]+$' THEN
        -- numeric: a long run of digits must not overflow before it is reported.
        IF token::numeric < lows[field] OR token::numeric > highs[field] THEN
            error := format('%s value %s out of range %s-%s',
                            names[field], token, lows[field], highs[field]);
        ELSE
            value := token::integer;
        END IF;
    ELSIF token ~ '^[A-Za-z]+$' THEN
        -- translate(), not upper(): ASCII only, whatever the locale (upper('i') is 'İ' in tr_TR).
        upper_tok := translate(token, 'abcdefghijklmnopqrstuvwxyz', 'ABCDEFGHIJKLMNOPQRSTUVWXYZ');
        IF field = 4 THEN
            pos := array_position(ARRAY['JAN', 'FEB', 'MAR', 'APR', 'MAY', 'JUN', 'JUL', 'AUG',
                                        'SEP', 'OCT', 'NOV', 'DEC'], upper_tok);
        ELSIF field = 5 THEN
            pos := array_position(ARRAY['SUN', 'MON', 'TUE', 'WED', 'THU', 'FRI', 'SAT'],
                                  upper_tok) - 1;
        END IF;
        IF pos IS NULL THEN
            error := format('unknown name ''%s'' in %s field', token, names[field]);
        ELSE
            value := pos;
        END IF;
    END IF;
END;
$$;

-- Why expr is not a valid cron expression (the reason only), or NULL if it is valid.
-- Keep in step with pgdurable/core/cron.py: same checks, same order, same texts.
CREATE OR REPLACE FUNCTION df._cron_error(expr text) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    names    text[] := ARRAY['minute', 'hour', 'day-of-month', 'month', 'day-of-week'];
    lows     integer[] := ARRAY[0, 0, 1, 1, 0];
    highs    integer[] := ARRAY[59, 23, 31, 12, 7];
    -- ASCII whitespace, spelled out (the regex engine reads the escapes): \s would depend on
    -- the database's locale, and cron.py must draw the same line.
    ws       text := '[ \t\n\r\v\f]';
    trimmed  text;
    fields   text[];
    field    integer;
    item     text;
    invalid  text;
    parts    text[];
    bounds   text[];
    low      integer;
    high     integer;
    step     integer;
    err      text;
    dom      integer[] := '{}';
    months   integer[] := '{}';
BEGIN
    trimmed := regexp_replace(expr, '^' || ws || '+|' || ws || '+$', '', 'g');
    fields := CASE WHEN trimmed = '' THEN '{}'::text[]
                   ELSE regexp_split_to_array(trimmed, ws || '+') END;
    IF fields[1] LIKE '@%' THEN
        RETURN format('macro ''%s'' is not supported; write the five fields instead', fields[1]);
    END IF;
    IF cardinality(fields) <> 5 THEN
        RETURN format('expected 5 fields (minute hour day-of-month month day-of-week), got %s',
                      cardinality(fields));
    END IF;

    FOR field IN 1..5 LOOP
        FOREACH item IN ARRAY string_to_array(fields[field], ',') LOOP
            invalid := format('invalid item ''%s'' in %s field', item, names[field]);
            IF item = '' THEN
                RETURN format('empty list item in %s field', names[field]);
            END IF;
            parts := string_to_array(item, '/');
            IF cardinality(parts) > 2 THEN
                RETURN invalid;
            END IF;
            IF parts[1] = '*' THEN
                low := lows[field];
                high := highs[field];
            ELSIF strpos(parts[1], '-') > 0 THEN
                bounds := string_to_array(parts[1], '-');
                IF cardinality(bounds) <> 2 THEN
                    RETURN invalid;
                END IF;
                SELECT v.value, v.error INTO low, err FROM df._cron_value(bounds[1], field) AS v;
                IF err IS NOT NULL THEN
                    RETURN err;
                ELSIF low IS NULL THEN
                    RETURN invalid;
                END IF;
                SELECT v.value, v.error INTO high, err FROM df._cron_value(bounds[2], field) AS v;
                IF err IS NOT NULL THEN
                    RETURN err;
                ELSIF high IS NULL THEN
                    RETURN invalid;
                END IF;
                IF high < low THEN
                    RETURN format('reversed range ''%s'' in %s field', parts[1], names[field]);
                END IF;
            ELSE
                SELECT v.value, v.error INTO low, err FROM df._cron_value(parts[1], field) AS v;
                IF err IS NOT NULL THEN
                    RETURN err;
                ELSIF low IS NULL THEN
                    RETURN invalid;
                END IF;
                high := CASE WHEN cardinality(parts) = 2 THEN highs[field] ELSE low END;
            END IF;
            step := 1;
            IF cardinality(parts) = 2 THEN
                IF parts[2] = '' THEN
                    RETURN format('missing step in ''%s''', item);
                ELSIF parts[2] !~ '^[0-9]+$' THEN
                    RETURN format('invalid step ''%s'' in ''%s''', parts[2], item);
                ELSIF parts[2]::numeric = 0 THEN
                    RETURN format('invalid step %s in ''%s''', parts[2], item);
                END IF;
                -- Any step past the field's span picks only `low`; clamp before the cast.
                step := least(parts[2]::numeric, 100)::integer;
            END IF;
            IF field = 3 THEN
                dom := dom || ARRAY(SELECT generate_series(low, high, step));
            ELSIF field = 4 THEN
                months := months || ARRAY(SELECT generate_series(low, high, step));
            END IF;
        END LOOP;
    END LOOP;

    -- Day-of-week a lone '*': only the day-of-month decides, and it must name a day that one
    -- of the months has (February: 29).
    IF fields[3] <> '*' AND fields[5] = '*' AND NOT EXISTS (
        SELECT 1 FROM unnest(dom) AS d, unnest(months) AS m
         WHERE d <= (ARRAY[31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31])[m]) THEN
        RETURN format('day-of-month ''%s'' never occurs in month ''%s''', fields[3], fields[4]);
    END IF;
    RETURN NULL;
END;
$$;

-- Wait until the next time the cron expression fires (UTC), e.g. in a loop:
--   @> (df.wait_for_schedule('*/5 * * * *') ~> 'CALL refresh()')
-- The expression is stored as given. IMMUTABLE like the operator helpers: the node depends
-- on the argument only.
CREATE OR REPLACE FUNCTION df.wait_for_schedule(cron_expr text) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT AS $$
DECLARE
    reason text := df._cron_error(cron_expr);
BEGIN
    IF reason IS NOT NULL THEN
        RAISE EXCEPTION 'Invalid cron expression ''%'': %', cron_expr, reason
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN df._envelope('WAIT_SCHEDULE', NULL, NULL, NULL, NULL,
                        '{"cron_expr":' || to_json(cron_expr)::text || '}', NULL);
END;
$$;
