//! Cross-field validation of a policy that parsed: references resolve, numbers are
//! sane, identifiers stay unusable. Each problem is (field path, message); the path
//! is located in the text by the caller.

use crate::domain::{self, MAX_DOMAIN};
use crate::model::{
    Budget, Column, ColumnType, Dataset, FhirExport, Grouping, Mechanism, PolicyFile, Source,
    Warehouse,
};
use phm_proto::Purpose;
use std::collections::BTreeMap;

type Problems = Vec<(String, String)>;

const PURPOSES: &str = "direct_care, planning, research";

/// Largest `max_rows_per_person` accepted: contributions scale sensitivity, and a
/// typo of 10000 instead of 10 would otherwise pass silently.
const MAX_ROWS_PER_PERSON: u32 = 1_000;

pub(crate) fn validate(f: &PolicyFile) -> Problems {
    let mut p = Problems::new();
    if f.version != 1 {
        p.push((
            "version".into(),
            format!(
                "policy language version {} is not supported; the only version is 1",
                f.version
            ),
        ));
    }
    organisation(f, &mut p);
    release(f, &mut p);
    unique(
        f.datasets.iter().map(|d| d.name.as_str()),
        "datasets",
        "name",
        "dataset",
        &mut p,
    );
    for (i, d) in f.datasets.iter().enumerate() {
        dataset(f, d, &format!("datasets[{i}]"), &mut p);
    }
    opt_out(f, &mut p);
    requesters(f, &mut p);
    projects(f, &mut p);
    peers(f, &mut p);
    linkage(f, &mut p);
    secure_aggregation(f, &mut p);
    p
}

/// The most people a linkage set may be declared to hold: beyond this a session's
/// sets would not fit the frames' memory budget on a partner's server.
const MAX_SET_SIZE: u64 = 50_000_000;

fn link_key(d: &Dataset, path: &str, p: &mut Problems) {
    let Some(key) = &d.link_key else { return };
    let ctx = format!("dataset {:?}", d.name);
    match d.columns.iter().find(|c| &c.name == key) {
        None => push(
            p,
            format!("{path}.link_key"),
            format!(
                "{ctx}: link_key column {key:?} is not among the columns ({})",
                names(&d.columns)
            ),
        ),
        Some(c) if !c.identifier || c.column_type != ColumnType::Text => push(
            p,
            format!("{path}.link_key"),
            format!(
                "{ctx}: link_key column {key:?} must be a text column marked identifier = true (it holds NHS numbers, which are never filtered, grouped or released)"
            ),
        ),
        Some(_) if key == &d.person_id => push(
            p,
            format!("{path}.link_key"),
            format!(
                "{ctx}: link_key {key:?} is the person_id column; link on the NHS number column, not the local pseudonym"
            ),
        ),
        Some(_) => {}
    }
}

fn secure_aggregation(f: &PolicyFile, p: &mut Problems) {
    let Some(s) = &f.secure_aggregation else {
        return;
    };
    let max = phm_proto::query::MAX_SECURE_COHORT;
    if !(2..=max).contains(&s.min_cohort) {
        push(
            p,
            "secure_aggregation.min_cohort",
            format!(
                "secure_aggregation: min_cohort {} must be between 2 and {max} (a session holds at most {max} nodes)",
                s.min_cohort
            ),
        );
    }
    if !(s.min_survivors.is_finite() && s.min_survivors > 0.0 && s.min_survivors <= 1.0) {
        push(
            p,
            "secure_aggregation.min_survivors",
            format!(
                "secure_aggregation: min_survivors {} must be above 0 and at most 1 (the fraction of the cohort the noise must hold with)",
                s.min_survivors
            ),
        );
    }
    if s.assumed_noiseless_peers >= s.min_cohort {
        push(
            p,
            "secure_aggregation.assumed_noiseless_peers",
            format!(
                "secure_aggregation: assumed_noiseless_peers {} must be below min_cohort {}",
                s.assumed_noiseless_peers, s.min_cohort
            ),
        );
    }
    if f.peers.is_none() {
        push(
            p,
            "secure_aggregation",
            "secure_aggregation needs a [peers] registry_key: the other members are known only through the signed node registry",
        );
    }
}

fn linkage(f: &PolicyFile, p: &mut Problems) {
    let Some(l) = &f.linkage else { return };
    purposes(&l.purposes, "linkage", "linkage.purposes", p);
    for (i, purpose) in l.purposes.iter().enumerate() {
        if Purpose::parse(purpose) == Some(Purpose::DirectCare) {
            push(
                p,
                format!("linkage.purposes[{i}]"),
                "linkage: linked population counts never serve direct_care; list planning or research",
            );
        }
    }
    if l.max_set_size == 0 || l.max_set_size > MAX_SET_SIZE {
        push(
            p,
            "linkage.max_set_size",
            format!(
                "linkage: max_set_size {} must be between 1 and {MAX_SET_SIZE}",
                l.max_set_size
            ),
        );
    }
    if f.peers.is_none() {
        push(
            p,
            "linkage",
            "linkage needs a [peers] registry_key: partners are known only through the signed node registry",
        );
    }
    unique(
        l.partners.iter().map(|x| x.ods_code.as_str()),
        "linkage.partners",
        "ods_code",
        "linkage partner",
        p,
    );
    for (i, partner) in l.partners.iter().enumerate() {
        let path = format!("linkage.partners[{i}]");
        let ctx = format!("linkage partner {:?}", partner.ods_code);
        check_name(
            p,
            &format!("{path}.ods_code"),
            "linkage partner",
            &partner.ods_code,
        );
        if partner.ods_code == f.organisation.ods_code {
            push(
                p,
                format!("{path}.ods_code"),
                format!("{ctx}: a node cannot link with itself"),
            );
        }
        if partner.roles.is_empty() {
            push(
                p,
                format!("{path}.roles"),
                format!("{ctx}: no roles listed (anchor, partner)"),
            );
        }
        if partner.our_datasets.is_empty() || partner.their_datasets.is_empty() {
            push(
                p,
                format!("{path}.our_datasets"),
                format!("{ctx}: list at least one of our datasets and one of theirs"),
            );
        }
        dataset_refs(
            f,
            &partner.our_datasets,
            &ctx,
            &format!("{path}.our_datasets"),
            p,
        );
        for (j, d) in partner.our_datasets.iter().enumerate() {
            if let Some(ds) = f.datasets.iter().find(|x| &x.name == d)
                && ds.link_key.is_none()
            {
                push(
                    p,
                    format!("{path}.our_datasets[{j}]"),
                    format!("{ctx}: dataset {d:?} declares no link_key, so it cannot be linked"),
                );
            }
        }
        for (j, d) in partner.their_datasets.iter().enumerate() {
            check_name(p, &format!("{path}.their_datasets[{j}]"), "dataset", d);
        }
    }
}

fn peers(f: &PolicyFile, p: &mut Problems) {
    let Some(peers) = &f.peers else { return };
    if let Err(e) = phm_proto::signing::public_key_from_base64(&peers.registry_key) {
        push(
            p,
            "peers.registry_key",
            format!(
                "the node registry's signing key: {e}; expected the base64 line `phm keys new` prints (32 bytes)"
            ),
        );
    }
}

fn push(p: &mut Problems, path: impl Into<String>, msg: impl Into<String>) {
    p.push((path.into(), msg.into()));
}

/// Names travel on the wire, where only these characters are accepted.
fn check_name(p: &mut Problems, path: &str, what: &str, name: &str) {
    if name.is_empty() {
        push(p, path, format!("{what} name is empty"));
    } else if name.len() > phm_proto::query::MAX_ID_LEN {
        push(
            p,
            path,
            format!(
                "{what} {name:?} is longer than {} bytes",
                phm_proto::query::MAX_ID_LEN
            ),
        );
    } else if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':' | '@')))
    {
        push(
            p,
            path,
            format!("{what} {name:?} contains {c:?}; use letters, digits and _ - . : @"),
        );
    }
}

fn unique<'a>(
    names: impl Iterator<Item = &'a str>,
    list: &str,
    field: &str,
    what: &str,
    p: &mut Problems,
) {
    let mut first: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, n) in names.enumerate() {
        if let Some(j) = first.get(n) {
            push(
                p,
                format!("{list}[{i}].{field}"),
                format!("{what} {n:?} is declared twice (first as {list}[{j}])"),
            );
        } else {
            first.insert(n, i);
        }
    }
}

fn finite_positive(x: f64) -> bool {
    x.is_finite() && x > 0.0
}

fn organisation(f: &PolicyFile, p: &mut Problems) {
    let o = &f.organisation;
    if o.ods_code.is_empty() || !o.ods_code.chars().all(|c| c.is_ascii_alphanumeric()) {
        push(
            p,
            "organisation.ods_code",
            format!(
                "ODS code {:?} must be letters and digits, e.g. \"A81001\" or \"RXF\"",
                o.ods_code
            ),
        );
    }
    if o.name.trim().is_empty() {
        push(p, "organisation.name", "organisation name is empty");
    }
}

fn release(f: &PolicyFile, p: &mut Problems) {
    let r = &f.release;
    if !finite_positive(r.per_query_epsilon_cap) {
        push(
            p,
            "release.per_query_epsilon_cap",
            format!(
                "per_query_epsilon_cap {} must be a finite number above 0",
                r.per_query_epsilon_cap
            ),
        );
    }
    if !(r.delta.is_finite() && r.delta >= 0.0 && r.delta < 1e-3) {
        push(
            p,
            "release.delta",
            format!("delta {} must be at least 0 and below 0.001", r.delta),
        );
    } else if r.mechanism == Mechanism::DiscreteGaussian && r.delta <= 0.0 {
        // Refused here, not per query: otherwise every Gaussian query would be
        // charged and then fail in the engine.
        push(
            p,
            "release.delta",
            "mechanism = \"discrete_gaussian\" needs release.delta above 0 (its zCDP \
             guarantee converts to (epsilon, delta)-DP only for delta > 0)"
                .to_string(),
        );
    }
    if !(r.min_threshold_epsilon.is_finite() && r.min_threshold_epsilon > 0.0) {
        push(
            p,
            "release.min_threshold_epsilon",
            format!(
                "min_threshold_epsilon {} must be a finite number above 0",
                r.min_threshold_epsilon
            ),
        );
    }
    if !(r.min_reportable_count.is_finite() && r.min_reportable_count >= 0.0) {
        push(
            p,
            "release.min_reportable_count",
            format!(
                "min_reportable_count {} must be a finite number, 0 or more",
                r.min_reportable_count
            ),
        );
    }
    if r.max_group_cells == 0 {
        push(
            p,
            "release.max_group_cells",
            "max_group_cells must be at least 1",
        );
    }
    if r.query_validity_seconds == 0 {
        push(
            p,
            "release.query_validity_seconds",
            "query_validity_seconds must be at least 1",
        );
    }
}

/// Longest statement timeout a warehouse source may set (a day).
pub const MAX_STATEMENT_TIMEOUT_SECONDS: u32 = 86_400;

/// A plain SQL identifier: ASCII letters, digits and underscores, not starting with a
/// digit, at most 63 bytes (PostgreSQL's limit).
fn is_sql_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && s.len() <= 63
}

fn source(d: &Dataset, path: &str, ctx: &str, p: &mut Problems) {
    match &d.source {
        Source::Parquet { path: file } | Source::Csv { path: file } => {
            if file.trim().is_empty() {
                push(
                    p,
                    format!("{path}.source.path"),
                    format!("{ctx}: source path is empty"),
                );
            }
        }
        Source::Postgres(w) => warehouse(w, path, ctx, p),
        Source::FhirNdjson(f) => fhir(f, path, ctx, p),
    }
}

fn fhir(f: &FhirExport, path: &str, ctx: &str, p: &mut Problems) {
    match (&f.manifest, f.files.is_empty()) {
        (Some(_), false) => push(
            p,
            format!("{path}.source"),
            format!("{ctx}: give the export by manifest or by files, not both"),
        ),
        (None, true) => push(
            p,
            format!("{path}.source"),
            format!(
                "{ctx}: a fhir_ndjson source needs manifest (the export's manifest JSON) or files (NDJSON files or folders)"
            ),
        ),
        _ => {}
    }
    let empty = |s: &String| s.trim().is_empty();
    if f.manifest.as_ref().is_some_and(empty) {
        push(
            p,
            format!("{path}.source.manifest"),
            format!("{ctx}: manifest is empty"),
        );
    }
    if let Some(i) = f.files.iter().position(empty) {
        push(
            p,
            format!("{path}.source.files[{i}]"),
            format!("{ctx}: file path is empty"),
        );
    }
    if f.views.is_empty() {
        push(
            p,
            format!("{path}.source.views"),
            format!(
                "{ctx}: a fhir_ndjson source needs at least one view (a ViewDefinition JSON file)"
            ),
        );
    }
    if let Some(i) = f.views.iter().position(empty) {
        push(
            p,
            format!("{path}.source.views[{i}]"),
            format!("{ctx}: view path is empty"),
        );
    }
    match &f.query {
        Some(q) if q.trim().is_empty() => push(
            p,
            format!("{path}.source.query"),
            format!("{ctx}: query is empty"),
        ),
        None if f.views.len() > 1 => push(
            p,
            format!("{path}.source.query"),
            format!(
                "{ctx}: {} views need a query (a SQL file joining their tables into the dataset's rows)",
                f.views.len()
            ),
        ),
        _ => {}
    }
}

fn warehouse(w: &Warehouse, path: &str, ctx: &str, p: &mut Problems) {
    let parts: Vec<&str> = w.relation.split('.').collect();
    if parts.len() > 2 || !parts.iter().all(|s| is_sql_identifier(s)) {
        push(
            p,
            format!("{path}.source.relation"),
            format!(
                "{ctx}: relation {:?} must be `name` or `schema.name`, each a plain SQL identifier (letters, digits and _, not starting with a digit, at most 63 bytes)",
                w.relation
            ),
        );
    }
    match (&w.dsn_env, &w.dsn_file) {
        (Some(_), Some(_)) => push(
            p,
            format!("{path}.source"),
            format!("{ctx}: give the connection string by dsn_env or by dsn_file, not both"),
        ),
        (None, None) => push(
            p,
            format!("{path}.source"),
            format!(
                "{ctx}: a postgres source needs dsn_env (an environment variable) or dsn_file (a secret file) holding the connection string; it is never written in the policy"
            ),
        ),
        (Some(var), None) => {
            let ok = !var.is_empty()
                && !var.starts_with(|c: char| c.is_ascii_digit())
                && var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok {
                push(
                    p,
                    format!("{path}.source.dsn_env"),
                    format!(
                        "{ctx}: dsn_env {var:?} is not an environment variable name (letters, digits and _)"
                    ),
                );
            }
        }
        (None, Some(file)) => {
            if file.trim().is_empty() {
                push(
                    p,
                    format!("{path}.source.dsn_file"),
                    format!("{ctx}: dsn_file is empty"),
                );
            }
        }
    }
    if w.ca_file.as_deref().is_some_and(|f| f.trim().is_empty()) {
        push(
            p,
            format!("{path}.source.ca_file"),
            format!("{ctx}: ca_file is empty"),
        );
    }
    if !(1..=MAX_STATEMENT_TIMEOUT_SECONDS).contains(&w.statement_timeout_seconds) {
        push(
            p,
            format!("{path}.source.statement_timeout_seconds"),
            format!(
                "{ctx}: statement_timeout_seconds {} must be between 1 and {MAX_STATEMENT_TIMEOUT_SECONDS}",
                w.statement_timeout_seconds
            ),
        );
    }
}

fn dataset(f: &PolicyFile, d: &Dataset, path: &str, p: &mut Problems) {
    let ctx = format!("dataset {:?}", d.name);
    check_name(p, &format!("{path}.name"), "dataset", &d.name);
    source(d, path, &ctx, p);
    if d.max_rows_per_person == 0 || d.max_rows_per_person > MAX_ROWS_PER_PERSON {
        push(
            p,
            format!("{path}.max_rows_per_person"),
            format!(
                "{ctx}: max_rows_per_person {} must be between 1 and {MAX_ROWS_PER_PERSON}",
                d.max_rows_per_person
            ),
        );
    }
    if d.columns.is_empty() {
        push(
            p,
            format!("{path}.columns"),
            format!("{ctx}: no columns declared"),
        );
    }
    unique(
        d.columns.iter().map(|c| c.name.as_str()),
        &format!("{path}.columns"),
        "name",
        &format!("{ctx}: column"),
        p,
    );
    match d.columns.iter().find(|c| c.name == d.person_id) {
        None => push(
            p,
            format!("{path}.person_id"),
            format!(
                "{ctx}: person_id column {:?} is not among the columns ({})",
                d.person_id,
                names(&d.columns)
            ),
        ),
        Some(c) if !c.identifier => push(
            p,
            format!("{path}.person_id"),
            format!(
                "{ctx}: person_id column {:?} must be marked identifier = true",
                d.person_id
            ),
        ),
        Some(_) => {}
    }
    for (i, c) in d.columns.iter().enumerate() {
        column(f, &ctx, c, &format!("{path}.columns[{i}]"), p);
    }
    link_key(d, path, p);
}

fn names(cols: &[Column]) -> String {
    cols.iter()
        .map(|c| c.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn column(f: &PolicyFile, ds_ctx: &str, c: &Column, path: &str, p: &mut Problems) {
    let ctx = format!("{ds_ctx}: column {:?}", c.name);
    check_name(p, &format!("{path}.name"), "column", &c.name);
    let numeric = c.column_type.is_numeric();
    if c.identifier {
        for (set, field) in [
            (c.filter, "filter"),
            (c.group != Grouping::No, "group"),
            (c.aggregate, "aggregate"),
        ] {
            if set {
                push(
                    p,
                    format!("{path}.{field}"),
                    format!(
                        "{ctx}: an identifier column can never be filtered, grouped or \
                         aggregated; remove `{field}`"
                    ),
                );
            }
        }
    }
    if let Some([lo, hi]) = c.bounds {
        if !numeric {
            push(
                p,
                format!("{path}.bounds"),
                format!(
                    "{ctx}: bounds apply to integer or real columns, not {}",
                    c.column_type.as_str()
                ),
            );
        } else if !(lo.is_finite() && hi.is_finite() && lo < hi) {
            push(
                p,
                format!("{path}.bounds"),
                format!("{ctx}: bounds [{lo}, {hi}] must be finite with lower below upper"),
            );
        }
    }
    if let Some(d) = &c.domain {
        match domain::domain_size(d) {
            Err(e) => push(p, format!("{path}.domain"), format!("{ctx}: {e}")),
            Ok(_) => {
                let t = domain::domain_type(d);
                if t != c.column_type {
                    push(
                        p,
                        format!("{path}.domain"),
                        format!(
                            "{ctx}: domain holds {} values but the column is {}",
                            t.as_str(),
                            c.column_type.as_str()
                        ),
                    );
                }
            }
        }
        if c.bin_edges.is_some() {
            push(
                p,
                format!("{path}.bin_edges"),
                format!("{ctx}: set either domain or bin_edges, not both"),
            );
        }
    }
    if let Some(edges) = &c.bin_edges {
        if !numeric {
            push(
                p,
                format!("{path}.bin_edges"),
                format!("{ctx}: bin_edges apply to integer or real columns"),
            );
        } else if edges.len() < 2 || edges.len() as u64 > MAX_DOMAIN + 1 {
            push(
                p,
                format!("{path}.bin_edges"),
                format!(
                    "{ctx}: bin_edges needs between 2 and {} edges, got {}",
                    MAX_DOMAIN + 1,
                    edges.len()
                ),
            );
        } else if let Some(w) = edges
            .windows(2)
            .find(|w| !(w[0].is_finite() && w[1].is_finite() && w[0] < w[1]))
        {
            push(
                p,
                format!("{path}.bin_edges"),
                format!(
                    "{ctx}: bin_edges must be finite and strictly increasing ({} then {})",
                    w[0], w[1]
                ),
            );
        }
    }
    if let Some(w) = c.min_bin_width {
        if !numeric {
            push(
                p,
                format!("{path}.min_bin_width"),
                format!("{ctx}: min_bin_width applies to integer or real columns"),
            );
        } else if !finite_positive(w) {
            push(
                p,
                format!("{path}.min_bin_width"),
                format!("{ctx}: min_bin_width {w} must be a finite number above 0"),
            );
        }
    }
    match c.group {
        Grouping::Declared if !c.identifier && !domain::declared_grouping_ok(c) => push(
            p,
            format!("{path}.group"),
            format!(
                "{ctx}: group = \"declared\" needs a domain, bin_edges, or (for an \
                 integer or real column) bounds"
            ),
        ),
        Grouping::Threshold if !c.identifier && f.release.delta <= 0.0 => push(
            p,
            format!("{path}.group"),
            format!(
                "{ctx}: group = \"threshold\" needs release.delta above 0 (thresholding \
                 is (epsilon, delta)-DP)"
            ),
        ),
        _ => {}
    }
    if c.aggregate && !c.identifier {
        if !numeric {
            push(
                p,
                format!("{path}.aggregate"),
                format!(
                    "{ctx}: only integer or real columns can be aggregated (SUM/AVG), this is {}",
                    c.column_type.as_str()
                ),
            );
        } else if c.bounds.is_none() {
            push(
                p,
                format!("{path}.bounds"),
                format!("{ctx}: aggregate = true needs bounds = [lower, upper] to clamp values to"),
            );
        }
    }
}

fn opt_out(f: &PolicyFile, p: &mut Problems) {
    let Some(o) = &f.opt_out else { return };
    for (i, purpose) in o.purposes.iter().enumerate() {
        if Purpose::parse(purpose).is_none() {
            push(
                p,
                format!("opt_out.purposes[{i}]"),
                format!("opt-out purpose {purpose:?} is not one of {PURPOSES}"),
            );
        }
    }
    for (i, d) in f.datasets.iter().enumerate() {
        if d.opt_out_not_applicable {
            continue;
        }
        match d.columns.iter().find(|c| c.name == o.column) {
            None => push(
                p,
                format!("datasets[{i}].columns"),
                format!(
                    "dataset {:?}: has no opt-out column {:?} (opt_out.column); add it, or \
                     set opt_out_not_applicable = true if this dataset cannot hold opted-out \
                     patients",
                    d.name, o.column
                ),
            ),
            Some(c) if c.column_type != ColumnType::Boolean => push(
                p,
                "opt_out.column",
                format!(
                    "opt-out column {:?} must be boolean, but dataset {:?} declares it {}",
                    o.column,
                    d.name,
                    c.column_type.as_str()
                ),
            ),
            Some(_) => {}
        }
    }
}

fn budget(b: &Budget, ctx: &str, path: &str, p: &mut Problems) {
    if !finite_positive(b.epsilon) {
        push(
            p,
            format!("{path}.epsilon"),
            format!(
                "{ctx}: budget epsilon {} must be a finite number above 0",
                b.epsilon
            ),
        );
    }
    if !(b.delta.is_finite() && b.delta >= 0.0 && b.delta < 1e-3) {
        push(
            p,
            format!("{path}.delta"),
            format!(
                "{ctx}: budget delta {} must be at least 0 and below 0.001 per {}",
                b.delta,
                b.period.as_str()
            ),
        );
    }
    if !finite_positive(b.per_query_cap) {
        push(
            p,
            format!("{path}.per_query_cap"),
            format!(
                "{ctx}: per_query_cap {} must be a finite number above 0",
                b.per_query_cap
            ),
        );
    } else if b.per_query_cap > b.epsilon {
        push(
            p,
            format!("{path}.per_query_cap"),
            format!(
                "{ctx}: per_query_cap {} is above the budget's epsilon {} per {}",
                b.per_query_cap,
                b.epsilon,
                b.period.as_str()
            ),
        );
    }
}

fn purposes(list: &[String], ctx: &str, path: &str, p: &mut Problems) {
    if list.is_empty() {
        push(p, path, format!("{ctx}: no purposes listed ({PURPOSES})"));
    }
    for (i, purpose) in list.iter().enumerate() {
        if Purpose::parse(purpose).is_none() {
            push(
                p,
                format!("{path}[{i}]"),
                format!("{ctx}: purpose {purpose:?} is not one of {PURPOSES}"),
            );
        }
    }
}

fn dataset_refs(f: &PolicyFile, list: &[String], ctx: &str, path: &str, p: &mut Problems) {
    for (i, d) in list.iter().enumerate() {
        if !f.datasets.iter().any(|x| &x.name == d) {
            push(
                p,
                format!("{path}[{i}]"),
                format!(
                    "{ctx}: dataset {d:?} is not declared (declared: {})",
                    listing(f.datasets.iter().map(|d| d.name.as_str()))
                ),
            );
        }
    }
}

fn listing<'a>(items: impl Iterator<Item = &'a str>) -> String {
    let v: Vec<&str> = items.collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

fn requesters(f: &PolicyFile, p: &mut Problems) {
    unique(
        f.requesters.iter().map(|r| r.id.as_str()),
        "requesters",
        "id",
        "requester",
        p,
    );
    for (i, r) in f.requesters.iter().enumerate() {
        let path = format!("requesters[{i}]");
        let ctx = format!("requester {:?}", r.id);
        check_name(p, &format!("{path}.id"), "requester", &r.id);
        if let Err(e) = phm_proto::signing::public_key_from_base64(&r.public_key) {
            push(
                p,
                format!("{path}.public_key"),
                format!("{ctx}: {e}; expected the base64 line `phm keys new` prints (32 bytes)"),
            );
        }
        purposes(&r.purposes, &ctx, &format!("{path}.purposes"), p);
        dataset_refs(f, &r.datasets, &ctx, &format!("{path}.datasets"), p);
        budget(&r.budget, &ctx, &format!("{path}.budget"), p);
    }
}

fn projects(f: &PolicyFile, p: &mut Problems) {
    unique(
        f.projects.iter().map(|r| r.id.as_str()),
        "projects",
        "id",
        "project",
        p,
    );
    let requester_ids = || listing(f.requesters.iter().map(|r| r.id.as_str()));
    for (i, pr) in f.projects.iter().enumerate() {
        let path = format!("projects[{i}]");
        let ctx = format!("project {:?}", pr.id);
        check_name(p, &format!("{path}.id"), "project", &pr.id);
        if pr.approval_ref.trim().is_empty() {
            push(
                p,
                format!("{path}.approval_ref"),
                format!("{ctx}: approval_ref is empty (give the REC/IRAS or committee reference)"),
            );
        }
        if !f.requesters.iter().any(|r| r.id == pr.lead) {
            push(
                p,
                format!("{path}.lead"),
                format!(
                    "{ctx}: lead {:?} is not a declared requester ({})",
                    pr.lead,
                    requester_ids()
                ),
            );
        }
        if pr.requesters.is_empty() {
            push(
                p,
                format!("{path}.requesters"),
                format!("{ctx}: no requesters listed"),
            );
        }
        for (j, r) in pr.requesters.iter().enumerate() {
            if !f.requesters.iter().any(|x| &x.id == r) {
                push(
                    p,
                    format!("{path}.requesters[{j}]"),
                    format!(
                        "{ctx}: requester {r:?} is not declared ({})",
                        requester_ids()
                    ),
                );
            }
        }
        dataset_refs(f, &pr.datasets, &ctx, &format!("{path}.datasets"), p);
        for (j, c) in pr.columns.iter().enumerate() {
            let found = f
                .datasets
                .iter()
                .filter(|d| pr.datasets.contains(&d.name))
                .any(|d| d.columns.iter().any(|x| &x.name == c));
            if !found {
                push(
                    p,
                    format!("{path}.columns[{j}]"),
                    format!(
                        "{ctx}: column {c:?} is in none of the project's datasets ({})",
                        listing(pr.datasets.iter().map(String::as_str))
                    ),
                );
            }
        }
        if expiry_date(&pr.expires).is_none() {
            push(
                p,
                format!("{path}.expires"),
                format!(
                    "{ctx}: expires {} must be a calendar date without a time, e.g. 2027-03-31",
                    pr.expires
                ),
            );
        }
        budget(&pr.budget, &ctx, &format!("{path}.budget"), p);
    }
}

/// The calendar date of a project expiry, if it is a plain, real date.
pub(crate) fn expiry_date(d: &toml::value::Datetime) -> Option<chrono::NaiveDate> {
    if d.time.is_some() || d.offset.is_some() {
        return None;
    }
    let date = d.date?;
    chrono::NaiveDate::from_ymd_opt(
        i32::from(date.year),
        u32::from(date.month),
        u32::from(date.day),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod peers_tests {
    use crate::Policy;

    const FULL: &str = include_str!("../samples/gp_practice.toml");

    /// The sample without its [peers] and [linkage] tables.
    fn sample() -> &'static str {
        FULL.split("\n# The federation's node registry")
            .next()
            .unwrap()
    }

    #[test]
    fn a_pinned_registry_key_is_read_and_a_bad_one_is_refused_with_its_field() {
        #[allow(non_snake_case)]
        let SAMPLE = sample();
        let key = phm_proto::signing::public_key_to_base64(
            &ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key(),
        );
        let with = format!("{SAMPLE}\n[peers]\nregistry_key = \"{key}\"\n");
        let p = Policy::parse("p.toml", &with).unwrap();
        assert!(p.registry_key().is_some());
        assert!(
            Policy::parse("p.toml", SAMPLE)
                .unwrap()
                .registry_key()
                .is_none()
        );
        let bad = format!("{SAMPLE}\n[peers]\nregistry_key = \"not-a-key\"\n");
        let e = Policy::parse("p.toml", &bad).unwrap_err().to_string();
        assert!(e.contains("peers.registry_key"), "{e}");
        let unknown = format!("{SAMPLE}\n[peers]\nregistry = \"{key}\"\n");
        assert!(Policy::parse("p.toml", &unknown).is_err());
        // Linkage needs the registry: partners are known only through it.
        let linkage = FULL.split("\n[linkage]").nth(1).unwrap();
        let unpinned = format!("{SAMPLE}\n[linkage]{linkage}");
        let e = Policy::parse("p.toml", &unpinned).unwrap_err().to_string();
        assert!(e.contains("registry_key"), "{e}");
    }
}
