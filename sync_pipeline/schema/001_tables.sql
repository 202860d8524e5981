-- The sync database's tables. Every table the product keeps is created here or in a later
-- numbered migration; no other module creates or alters a persistent table. Three kinds of
-- columns and tables are not here:
--   * the derived columns of the snapshot tables (`_key_*`, `_fh_*`, `_fat_*`, `_link_sig`):
--     they follow the YAML mapping, so `derived.refresh` adds them when the mapping changes;
--   * `sync_plan` and `account_manager_candidates`: an asset's output, replaced whole by that
--     asset on every run (`diff.PLAN_DDL`, `account_managers`);
--   * temporary tables of one pass.

-- Raw snapshots: one row per record as the API returned it (`data`), the time the source says it
-- changed (`modified`), whether it is still there (`active`), and `_derived_mod`, the `modified`
-- the derived columns were computed for (cleared by every upsert).
CREATE TABLE IF NOT EXISTS crm_companies (
    id VARCHAR PRIMARY KEY, modified TIMESTAMP, active BOOLEAN NOT NULL DEFAULT TRUE,
    data JSON, extracted_at TIMESTAMP, _derived_mod TIMESTAMP
);
CREATE TABLE IF NOT EXISTS crm_contacts (
    id VARCHAR PRIMARY KEY, parent_id VARCHAR, modified TIMESTAMP,
    active BOOLEAN NOT NULL DEFAULT TRUE, data JSON, extracted_at TIMESTAMP,
    _derived_mod TIMESTAMP
);
CREATE TABLE IF NOT EXISTS crm_users (
    id VARCHAR PRIMARY KEY, modified TIMESTAMP, active BOOLEAN NOT NULL DEFAULT TRUE,
    data JSON, extracted_at TIMESTAMP, _derived_mod TIMESTAMP
);
CREATE TABLE IF NOT EXISTS unleashed_customers (
    id VARCHAR PRIMARY KEY, modified TIMESTAMP, active BOOLEAN NOT NULL DEFAULT TRUE,
    data JSON, extracted_at TIMESTAMP, _derived_mod TIMESTAMP
);
CREATE TABLE IF NOT EXISTS unleashed_contacts (
    id VARCHAR PRIMARY KEY, parent_id VARCHAR, modified TIMESTAMP,
    active BOOLEAN NOT NULL DEFAULT TRUE, data JSON, extracted_at TIMESTAMP,
    _derived_mod TIMESTAMP
);
CREATE TABLE IF NOT EXISTS unleashed_salespersons (
    id VARCHAR PRIMARY KEY, modified TIMESTAMP, active BOOLEAN NOT NULL DEFAULT TRUE,
    data JSON, extracted_at TIMESTAMP, _derived_mod TIMESTAMP
);

-- Extract progress per source: the high-water mark of the last delta read, and the counts the
-- `received_what_the_api_reported` checks compare.
CREATE TABLE IF NOT EXISTS extract_state (
    source VARCHAR PRIMARY KEY, high_water TIMESTAMP, last_run_at TIMESTAMP,
    reported_total BIGINT, rows_received BIGINT
);
CREATE TABLE IF NOT EXISTS sync_state (
    key VARCHAR PRIMARY KEY, value VARCHAR, updated_at TIMESTAMP
);
-- Records an extract set aside as malformed; `parent_id` is the record a malformed part belongs
-- to (a contact's customer; the customer itself when its contact list is malformed).
CREATE TABLE IF NOT EXISTS bad_records (
    system VARCHAR, endpoint VARCHAR, record_id VARCHAR, reason VARCHAR,
    first_seen TIMESTAMP, last_seen TIMESTAMP, resolved_at TIMESTAMP, parent_id VARCHAR,
    PRIMARY KEY (system, endpoint, record_id)
);
-- Every operation before its API call. status: pending, in_flight, in_doubt, applied, failed,
-- deferred, superseded, refused. `failures` counts failed tries for the retry bound;
-- `next_attempt_at` is when the retry sensor launches a run for it (NULL: none).
CREATE TABLE IF NOT EXISTS outbox (
    op_id VARCHAR PRIMARY KEY, op_key VARCHAR NOT NULL, run_id VARCHAR, created_at TIMESTAMP,
    entity VARCHAR, op VARCHAR,
    crm_id VARCHAR, erp_id VARCHAR, crm_parent_id VARCHAR, erp_parent_id VARCHAR,
    field VARCHAR, old_value VARCHAR, new_value VARCHAR, payload JSON,
    conflict BOOLEAN, policy VARCHAR, reason VARCHAR,
    status VARCHAR NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, last_error VARCHAR,
    applied_at TIMESTAMP, result_id VARCHAR,
    failures INTEGER DEFAULT 0, next_attempt_at TIMESTAMP
);
-- Every write made, after the API answered.
CREATE TABLE IF NOT EXISTS audit_log (
    logged_at TIMESTAMP, run_id VARCHAR, op_id VARCHAR,
    entity VARCHAR, crm_id VARCHAR, erp_id VARCHAR, field VARCHAR,
    old_value VARCHAR, new_value VARCHAR, direction VARCHAR, reason VARCHAR
);
-- Values not sent (refused at planning or by the server), open until the plan no longer has them.
CREATE TABLE IF NOT EXISTS rejections (
    entity VARCHAR, crm_id VARCHAR, erp_id VARCHAR, field VARCHAR, value VARCHAR, reason VARCHAR,
    first_seen TIMESTAMP, last_seen TIMESTAMP, resolved_at TIMESTAMP
);
-- Every conflict seen, with both values and the decision (history; pruned).
CREATE TABLE IF NOT EXISTS conflicts (
    seen_at TIMESTAMP, run_id VARCHAR, entity VARCHAR, crm_id VARCHAR, erp_id VARCHAR,
    field VARCHAR, crm_value VARCHAR, erp_value VARCHAR, baseline_value VARCHAR,
    winner VARCHAR, policy VARCHAR, crm_modified TIMESTAMP, erp_modified TIMESTAMP,
    op_key VARCHAR PRIMARY KEY
);
-- The decision the planner keeps for each field's current `newest` conflict: one row per
-- (record, field), so the planner's lookup does not grow with the history in `conflicts`.
CREATE TABLE IF NOT EXISTS conflict_decisions (
    entity VARCHAR, erp_id VARCHAR, field VARCHAR,
    crm_value VARCHAR, erp_value VARCHAR, baseline_value VARCHAR,
    winner VARCHAR, seen_at TIMESTAMP,
    PRIMARY KEY (entity, erp_id, field)
);

-- Links (sync_pipeline/links.py): which CRM record is which Unleashed record, one-to-one.
CREATE TABLE IF NOT EXISTS company_links (
    crm_id VARCHAR NOT NULL, erp_id VARCHAR NOT NULL, method VARCHAR, linked_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS contact_links (
    crm_id VARCHAR NOT NULL, erp_id VARCHAR NOT NULL,
    crm_parent_id VARCHAR, erp_parent_id VARCHAR, method VARCHAR, linked_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS link_issues (
    entity VARCHAR, kind VARCHAR, method VARCHAR, key_value VARCHAR,
    crm_ids VARCHAR[], erp_ids VARCHAR[], detail VARCHAR, seen_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS link_state (name VARCHAR PRIMARY KEY, value VARCHAR);

-- Baseline (sync_pipeline/baseline.py): the last agreed values per linked record, and the
-- records the next planning pass looks at.
CREATE TABLE IF NOT EXISTS sync_baseline (
    entity VARCHAR NOT NULL, erp_id VARCHAR NOT NULL,
    crm_values JSON NOT NULL, erp_values JSON NOT NULL, agreed_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS sync_pending (
    entity VARCHAR NOT NULL, side VARCHAR NOT NULL, id VARCHAR NOT NULL
);
CREATE TABLE IF NOT EXISTS sync_pending_state (entity VARCHAR PRIMARY KEY);
CREATE TABLE IF NOT EXISTS sync_creation_baseline (
    entity VARCHAR NOT NULL, erp_id VARCHAR NOT NULL, field VARCHAR NOT NULL,
    value VARCHAR NOT NULL
);

-- Derived columns' upkeep (sync_pipeline/derived.py).
CREATE TABLE IF NOT EXISTS derived_state (
    table_name VARCHAR PRIMARY KEY, fingerprint VARCHAR, refreshed_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS derived_counters (name VARCHAR PRIMARY KEY, value BIGINT NOT NULL);

-- The last preflight (sync_pipeline/preflight.py), which writers check.
CREATE TABLE IF NOT EXISTS preflight_state (
    checked_at TIMESTAMP, fingerprint VARCHAR, ok BOOLEAN, report VARCHAR
);
