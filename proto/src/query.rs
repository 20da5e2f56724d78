//! Domain types for a query, validated on receipt from the wire (`TryFrom<proto::…>`)
//! and converted back (`From<…> for proto::…`).

use crate::proto;
use serde::{Deserialize, Serialize};

/// Deepest filter tree accepted; deeper trees are refused as invalid, not recursed into.
pub const MAX_PREDICATE_DEPTH: usize = 32;
/// Most predicate nodes accepted in one filter.
pub const MAX_PREDICATE_NODES: usize = 1_000;
pub const MAX_GROUP_KEYS: usize = 8;
pub const MAX_AGGREGATES: usize = 16;
pub const MAX_ID_LEN: usize = 128;
/// Most nodes in one secure-aggregation session (Shamir over GF(2^8) has 255 points).
pub const MAX_SECURE_COHORT: u32 = 255;
pub const MAX_TEXT_LITERAL_LEN: usize = 1_024;
pub const MIN_NONCE_LEN: usize = 16;
pub const MAX_NONCE_LEN: usize = 64;
/// Largest `k` of a linked query's `HAVING COUNT(*) >= k`.
pub const MAX_MIN_PARTNER_ROWS: u32 = 100;

/// A fresh nonce: `MIN_NONCE_LEN` bytes from the operating system's random source,
/// for every requester that signs (the CLI, the console, the test suites).
pub fn fresh_nonce() -> Vec<u8> {
    use rand::RngCore;
    let mut n = vec![0u8; MIN_NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut n);
    n
}

/// Now, as the `issued_at_unix_ms` of a request (0 on a clock before 1970, which every
/// verifier then refuses as stale).
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
/// Smallest epsilon accepted on the wire. Below it the noise scale overflows what a
/// mechanism can represent, and no useful answer could come back anyway.
pub const MIN_EPSILON: f64 = 1e-6;

/// What is wrong with a message received from the wire.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProtocolError {
    #[error("field `{0}` is missing")]
    Missing(&'static str),
    #[error("field `{field}` is invalid: {reason}")]
    Invalid { field: &'static str, reason: String },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ProtocolError {
    ProtocolError::Invalid {
        field,
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Purpose {
    DirectCare,
    Planning,
    Research,
}

impl Purpose {
    pub const ALL: [Purpose; 3] = [Purpose::DirectCare, Purpose::Planning, Purpose::Research];

    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::DirectCare => "direct_care",
            Purpose::Planning => "planning",
            Purpose::Research => "research",
        }
    }

    pub fn parse(s: &str) -> Option<Purpose> {
        Purpose::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

impl std::fmt::Display for Purpose {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Literal {
    Boolean(bool),
    Integer(i64),
    Real(f64),
    Text(String),
}

impl std::fmt::Display for Literal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Literal::Text(s) => write!(f, "'{}'", s.replace('\'', "''")),
            Literal::Integer(i) => write!(f, "{i}"),
            Literal::Real(r) => write!(f, "{r}"),
            Literal::Boolean(b) => write!(f, "{b}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl CompareOp {
    pub fn symbol(self) -> &'static str {
        match self {
            CompareOp::Eq => "=",
            CompareOp::Ne => "<>",
            CompareOp::Lt => "<",
            CompareOp::Le => "<=",
            CompareOp::Gt => ">",
            CompareOp::Ge => ">=",
        }
    }
}

/// A filter predicate tree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Predicate {
    Compare {
        column: String,
        op: CompareOp,
        value: Literal,
    },
    InList {
        column: String,
        values: Vec<Literal>,
        negated: bool,
    },
    Between {
        column: String,
        low: Literal,
        high: Literal,
        negated: bool,
    },
    IsNull {
        column: String,
        negated: bool,
    },
    All(Vec<Predicate>),
    Any(Vec<Predicate>),
    Not(Box<Predicate>),
}

impl Predicate {
    /// Every column the predicate reads, in order of appearance (with repeats).
    pub fn columns(&self) -> Vec<&str> {
        let mut out = Vec::new();
        self.visit_columns(&mut out);
        out
    }

    fn visit_columns<'a>(&'a self, out: &mut Vec<&'a str>) {
        match self {
            Predicate::Compare { column, .. }
            | Predicate::InList { column, .. }
            | Predicate::Between { column, .. }
            | Predicate::IsNull { column, .. } => out.push(column),
            Predicate::All(ps) | Predicate::Any(ps) => {
                ps.iter().for_each(|p| p.visit_columns(out));
            }
            Predicate::Not(p) => p.visit_columns(out),
        }
    }
}

impl std::fmt::Display for Predicate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        fn join(f: &mut std::fmt::Formatter<'_>, ps: &[Predicate], sep: &str) -> std::fmt::Result {
            write!(f, "(")?;
            for (i, p) in ps.iter().enumerate() {
                if i > 0 {
                    write!(f, " {sep} ")?;
                }
                write!(f, "{p}")?;
            }
            write!(f, ")")
        }
        let not = |n: bool| if n { "NOT " } else { "" };
        match self {
            Predicate::Compare { column, op, value } => {
                write!(f, "{column} {} {value}", op.symbol())
            }
            Predicate::InList {
                column,
                values,
                negated,
            } => {
                write!(f, "{column} {}IN (", not(*negated))?;
                for (i, v) in values.iter().enumerate() {
                    if i > 0 {
                        write!(f, ", ")?;
                    }
                    write!(f, "{v}")?;
                }
                write!(f, ")")
            }
            Predicate::Between {
                column,
                low,
                high,
                negated,
            } => write!(f, "{column} {}BETWEEN {low} AND {high}", not(*negated)),
            Predicate::IsNull { column, negated } => {
                write!(f, "{column} IS {}NULL", not(*negated))
            }
            Predicate::All(ps) => join(f, ps, "AND"),
            Predicate::Any(ps) => join(f, ps, "OR"),
            Predicate::Not(p) => write!(f, "NOT {p}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum GroupKey {
    Column(String),
    /// `floor(value / width) * width`.
    Bin {
        column: String,
        width: f64,
    },
}

impl GroupKey {
    pub fn column(&self) -> &str {
        match self {
            GroupKey::Column(c) | GroupKey::Bin { column: c, .. } => c,
        }
    }

    /// The label used for this key in results, e.g. `bin(age, 10)`.
    pub fn label(&self) -> String {
        match self {
            GroupKey::Column(c) => c.clone(),
            GroupKey::Bin { column, width } => format!("bin({column}, {width})"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum AggregateKind {
    Count,
    Sum,
    Mean,
    /// Reserved: nodes refuse it today.
    Quantile(f64),
}

impl AggregateKind {
    pub fn name(self) -> &'static str {
        match self {
            AggregateKind::Count => "COUNT",
            AggregateKind::Sum => "SUM",
            AggregateKind::Mean => "AVG",
            AggregateKind::Quantile(_) => "QUANTILE",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Aggregate {
    pub alias: String,
    pub kind: AggregateKind,
    /// `None` only for `COUNT(*)`.
    pub column: Option<String>,
}

/// A linked question's other half: `[NOT] EXISTS (SELECT 1 FROM partner_dataset a WHERE
/// a.person = g.person AND partner_filter [GROUP BY a.person HAVING COUNT(*) >= k])`.
/// `person` is each dataset's declared link key, so a query never names an identifier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Linkage {
    pub partner_dataset: String,
    pub partner_filter: Option<Predicate>,
    pub negated: bool,
    /// `k` of `HAVING COUNT(*) >= k`; 1 means "at least one row" (plain EXISTS).
    pub min_partner_rows: u32,
}

impl Linkage {
    /// Readable SQL of the EXISTS clause, as the outer query's alias `g` sees it.
    pub fn to_sql(&self) -> String {
        let mut inner = format!(
            "SELECT 1 FROM {} a WHERE a.person = g.person",
            self.partner_dataset
        );
        if let Some(f) = &self.partner_filter {
            inner.push_str(&format!(" AND {f}"));
        }
        if self.min_partner_rows > 1 {
            inner.push_str(&format!(
                " GROUP BY a.person HAVING COUNT(*) >= {}",
                self.min_partner_rows
            ));
        }
        let not = if self.negated { "NOT " } else { "" };
        format!("{not}EXISTS ({inner})")
    }
}

/// Everything a requester signs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueryBody {
    /// The federation the requester signed this for; every node and the coordinator
    /// refuses a query for another federation (an audience, so a signature is not
    /// valid in a second federation that lists the same key).
    pub federation_id: String,
    pub query_id: String,
    pub requester_id: String,
    pub purpose: Purpose,
    pub project_id: Option<String>,
    pub dataset: String,
    pub filter: Option<Predicate>,
    pub group_by: Vec<GroupKey>,
    pub aggregates: Vec<Aggregate>,
    pub epsilon: f64,
    pub issued_at_unix_ms: i64,
    pub nonce: Vec<u8>,
    /// Set for a linked question (see [`Linkage`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub linkage: Option<Linkage>,
    /// How the partners' answers are combined (plain unless the requester asked for
    /// secure aggregation).
    #[serde(default, skip_serializing_if = "Aggregation::is_plain")]
    pub aggregation: Aggregation,
}

/// How the partners' answers are combined into the system figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    /// Each node releases its own noisy figures; the coordinator adds them up.
    #[default]
    Plain,
    /// One secure-aggregation session: the coordinator learns only the system total,
    /// each node adding a share of the noise (`phm-secagg`).
    SecureSum,
}

impl Aggregation {
    pub fn is_plain(&self) -> bool {
        *self == Aggregation::Plain
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Aggregation::Plain => "plain",
            Aggregation::SecureSum => "secure_sum",
        }
    }
}

impl QueryBody {
    /// Every column the query reads (group keys, aggregates, filter), deduplicated.
    pub fn columns(&self) -> Vec<&str> {
        let mut cols: Vec<&str> = self.group_by.iter().map(GroupKey::column).collect();
        cols.extend(self.aggregates.iter().filter_map(|a| a.column.as_deref()));
        if let Some(f) = &self.filter {
            cols.extend(f.columns());
        }
        let mut seen = std::collections::BTreeSet::new();
        cols.retain(|c| seen.insert(*c));
        cols
    }

    /// Readable SQL for logs, audit and `explain`.
    pub fn to_sql(&self) -> String {
        let mut items: Vec<String> = self.group_by.iter().map(GroupKey::label).collect();
        for a in &self.aggregates {
            let arg = a.column.as_deref().unwrap_or("*");
            items.push(format!("{}({arg}) AS {}", a.kind.name(), a.alias));
        }
        let mut sql = format!("SELECT {} FROM {}", items.join(", "), self.dataset);
        let mut conditions: Vec<String> = self.filter.iter().map(|f| f.to_string()).collect();
        if let Some(l) = &self.linkage {
            sql.push_str(" g");
            conditions.push(l.to_sql());
        }
        if !conditions.is_empty() {
            sql.push_str(&format!(" WHERE {}", conditions.join(" AND ")));
        }
        if !self.group_by.is_empty() {
            let keys: Vec<String> = self.group_by.iter().map(GroupKey::label).collect();
            sql.push_str(&format!(" GROUP BY {}", keys.join(", ")));
        }
        sql
    }
}

/// A requester's query id: the key of the node's release cache and the coordinator's
/// history. Query ids are a per-requester namespace, so one requester can neither
/// learn that another used an id nor squat it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueryKey<'a> {
    pub requester_id: &'a str,
    pub query_id: &'a str,
}

impl QueryKey<'_> {
    /// `requester \0 query id`: ids cannot contain NUL (validated on receipt), so the
    /// key is unambiguous.
    pub fn key_bytes(&self) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.requester_id.len() + self.query_id.len() + 1);
        k.extend_from_slice(self.requester_id.as_bytes());
        k.push(0);
        k.extend_from_slice(self.query_id.as_bytes());
        k
    }
}

/// A query with the requester's signature. The signature is checked by the node
/// ([`SignedQuery::verify`]), never by the coordinator, which only relays it.
#[derive(Debug, Clone, PartialEq)]
pub struct SignedQuery {
    pub body: QueryBody,
    pub signature: Vec<u8>,
}

/// Which RPC a [`RequesterProof`] authorises, so a proof for one cannot be replayed
/// against another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProofOp {
    Describe,
    Budget,
    /// Read (or replay) a stored combined result; the proof's subject is the query id.
    GetResult,
}

impl ProofOp {
    pub fn as_str(self) -> &'static str {
        match self {
            ProofOp::Describe => "describe",
            ProofOp::Budget => "budget",
            ProofOp::GetResult => "get_result",
        }
    }
}

/// A signed "it is me asking" for Describe, Budget and GetResult.
#[derive(Debug, Clone, PartialEq)]
pub struct RequesterProof {
    /// The federation the proof is for.
    pub federation_id: String,
    /// What the proof is about (the query id for GetResult), if anything.
    pub subject: Option<String>,
    pub requester_id: String,
    pub project_id: Option<String>,
    pub issued_at_unix_ms: i64,
    pub nonce: Vec<u8>,
    pub signature: Vec<u8>,
}

// ---------------------------------------------------------------------------------
// Wire -> domain (validating) and domain -> wire.

fn check_id(field: &'static str, s: &str, required: bool) -> Result<(), ProtocolError> {
    if s.is_empty() {
        return if required {
            Err(ProtocolError::Missing(field))
        } else {
            Ok(())
        };
    }
    if s.len() > MAX_ID_LEN {
        return Err(invalid(
            field,
            format!("longer than {MAX_ID_LEN} bytes ({} bytes)", s.len()),
        ));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':' | '@')))
    {
        return Err(invalid(
            field,
            format!("character {c:?} is not allowed (use letters, digits and _ - . : @): {s:?}"),
        ));
    }
    Ok(())
}

/// Longest federation id accepted.
pub const MAX_FEDERATION_ID_LEN: usize = 128;

/// Check a federation id as configured at a node or the coordinator: non-empty, at most 128 characters, letters, digits and
/// `_ - . :` only (it is compared byte for byte and printed in refusals).
pub fn validate_federation_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("is empty; name the federation, e.g. federation_id = \"synthetic-ics\"".into());
    }
    if id.len() > MAX_FEDERATION_ID_LEN {
        return Err(format!(
            "is {} characters long; at most {MAX_FEDERATION_ID_LEN}",
            id.len()
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':')))
    {
        return Err(format!(
            "{id:?} contains {c:?}; use only letters, digits and _ - . :"
        ));
    }
    Ok(())
}

fn check_nonce(nonce: &[u8]) -> Result<(), ProtocolError> {
    if nonce.len() < MIN_NONCE_LEN || nonce.len() > MAX_NONCE_LEN {
        return Err(invalid(
            "nonce",
            format!(
                "must be {MIN_NONCE_LEN} to {MAX_NONCE_LEN} random bytes, got {}",
                nonce.len()
            ),
        ));
    }
    Ok(())
}

impl TryFrom<i32> for Purpose {
    type Error = ProtocolError;
    fn try_from(v: i32) -> Result<Self, Self::Error> {
        match proto::Purpose::try_from(v) {
            Ok(proto::Purpose::DirectCare) => Ok(Purpose::DirectCare),
            Ok(proto::Purpose::Planning) => Ok(Purpose::Planning),
            Ok(proto::Purpose::Research) => Ok(Purpose::Research),
            Ok(proto::Purpose::Unspecified) => Err(ProtocolError::Missing("purpose")),
            Err(_) => Err(invalid("purpose", format!("unknown purpose code {v}"))),
        }
    }
}

impl From<Purpose> for proto::Purpose {
    fn from(p: Purpose) -> Self {
        match p {
            Purpose::DirectCare => proto::Purpose::DirectCare,
            Purpose::Planning => proto::Purpose::Planning,
            Purpose::Research => proto::Purpose::Research,
        }
    }
}

fn literal_from_proto(
    v: Option<proto::Value>,
    field: &'static str,
) -> Result<Literal, ProtocolError> {
    use proto::value::Kind;
    match v.and_then(|v| v.kind) {
        None => Err(ProtocolError::Missing(field)),
        Some(Kind::Text(s)) => {
            if s.len() > MAX_TEXT_LITERAL_LEN {
                Err(invalid(
                    field,
                    format!("text literal longer than {MAX_TEXT_LITERAL_LEN} bytes"),
                ))
            } else {
                Ok(Literal::Text(s))
            }
        }
        Some(Kind::Integer(i)) => Ok(Literal::Integer(i)),
        Some(Kind::Real(r)) if r.is_finite() => Ok(Literal::Real(r)),
        Some(Kind::Real(r)) => Err(invalid(field, format!("number {r} is not finite"))),
        Some(Kind::Boolean(b)) => Ok(Literal::Boolean(b)),
    }
}

impl From<Literal> for proto::Value {
    fn from(l: Literal) -> Self {
        use proto::value::Kind;
        let kind = match l {
            Literal::Text(s) => Kind::Text(s),
            Literal::Integer(i) => Kind::Integer(i),
            Literal::Real(r) => Kind::Real(r),
            Literal::Boolean(b) => Kind::Boolean(b),
        };
        proto::Value { kind: Some(kind) }
    }
}

fn column_name(field: &'static str, c: String) -> Result<String, ProtocolError> {
    check_id(field, &c, true)?;
    Ok(c)
}

fn compare_op(v: i32) -> Result<CompareOp, ProtocolError> {
    use proto::CompareOp as P;
    match P::try_from(v) {
        Ok(P::Eq) => Ok(CompareOp::Eq),
        Ok(P::Ne) => Ok(CompareOp::Ne),
        Ok(P::Lt) => Ok(CompareOp::Lt),
        Ok(P::Le) => Ok(CompareOp::Le),
        Ok(P::Gt) => Ok(CompareOp::Gt),
        Ok(P::Ge) => Ok(CompareOp::Ge),
        _ => Err(invalid(
            "filter.comparison.op",
            format!("unknown operator code {v}"),
        )),
    }
}

fn predicate_from_proto(
    p: proto::Predicate,
    depth: usize,
    nodes: &mut usize,
) -> Result<Predicate, ProtocolError> {
    use proto::predicate::Kind;
    *nodes += 1;
    if depth > MAX_PREDICATE_DEPTH {
        return Err(invalid(
            "filter",
            format!("nested deeper than {MAX_PREDICATE_DEPTH} levels"),
        ));
    }
    if *nodes > MAX_PREDICATE_NODES {
        return Err(invalid(
            "filter",
            format!("more than {MAX_PREDICATE_NODES} conditions"),
        ));
    }
    let junction =
        |j: proto::Junction, nodes: &mut usize| -> Result<Vec<Predicate>, ProtocolError> {
            if j.operands.is_empty() {
                return Err(invalid("filter", "AND/OR with no operands"));
            }
            j.operands
                .into_iter()
                .map(|p| predicate_from_proto(p, depth + 1, nodes))
                .collect()
        };
    match p.kind {
        None => Err(ProtocolError::Missing("filter.kind")),
        Some(Kind::Comparison(proto::Comparison { column, op, value })) => Ok(Predicate::Compare {
            column: column_name("filter.comparison.column", column)?,
            op: compare_op(op)?,
            value: literal_from_proto(value, "filter.comparison.value")?,
        }),
        Some(Kind::InList(proto::InList {
            column,
            values,
            negated,
        })) => {
            if values.is_empty() {
                return Err(invalid("filter.in_list.values", "IN list is empty"));
            }
            *nodes += values.len();
            if *nodes > MAX_PREDICATE_NODES {
                return Err(invalid(
                    "filter",
                    format!("more than {MAX_PREDICATE_NODES} conditions"),
                ));
            }
            Ok(Predicate::InList {
                column: column_name("filter.in_list.column", column)?,
                values: values
                    .into_iter()
                    .map(|v| literal_from_proto(Some(v), "filter.in_list.values"))
                    .collect::<Result<_, _>>()?,
                negated,
            })
        }
        Some(Kind::Between(proto::Between {
            column,
            low,
            high,
            negated,
        })) => Ok(Predicate::Between {
            column: column_name("filter.between.column", column)?,
            low: literal_from_proto(low, "filter.between.low")?,
            high: literal_from_proto(high, "filter.between.high")?,
            negated,
        }),
        Some(Kind::IsNull(proto::IsNull { column, negated })) => Ok(Predicate::IsNull {
            column: column_name("filter.is_null.column", column)?,
            negated,
        }),
        Some(Kind::All(j)) => Ok(Predicate::All(junction(j, nodes)?)),
        Some(Kind::Any(j)) => Ok(Predicate::Any(junction(j, nodes)?)),
        Some(Kind::Not(n)) => {
            let inner = n
                .operand
                .ok_or(ProtocolError::Missing("filter.not.operand"))?;
            Ok(Predicate::Not(Box::new(predicate_from_proto(
                *inner,
                depth + 1,
                nodes,
            )?)))
        }
    }
}

impl TryFrom<proto::Predicate> for Predicate {
    type Error = ProtocolError;
    fn try_from(p: proto::Predicate) -> Result<Self, Self::Error> {
        predicate_from_proto(p, 0, &mut 0)
    }
}

impl From<Predicate> for proto::Predicate {
    fn from(p: Predicate) -> Self {
        use proto::predicate::Kind;
        let kind = match p {
            Predicate::Compare { column, op, value } => Kind::Comparison(proto::Comparison {
                column,
                op: match op {
                    CompareOp::Eq => proto::CompareOp::Eq,
                    CompareOp::Ne => proto::CompareOp::Ne,
                    CompareOp::Lt => proto::CompareOp::Lt,
                    CompareOp::Le => proto::CompareOp::Le,
                    CompareOp::Gt => proto::CompareOp::Gt,
                    CompareOp::Ge => proto::CompareOp::Ge,
                } as i32,
                value: Some(value.into()),
            }),
            Predicate::InList {
                column,
                values,
                negated,
            } => Kind::InList(proto::InList {
                column,
                values: values.into_iter().map(Into::into).collect(),
                negated,
            }),
            Predicate::Between {
                column,
                low,
                high,
                negated,
            } => Kind::Between(proto::Between {
                column,
                low: Some(low.into()),
                high: Some(high.into()),
                negated,
            }),
            Predicate::IsNull { column, negated } => {
                Kind::IsNull(proto::IsNull { column, negated })
            }
            Predicate::All(ps) => Kind::All(proto::Junction {
                operands: ps.into_iter().map(Into::into).collect(),
            }),
            Predicate::Any(ps) => Kind::Any(proto::Junction {
                operands: ps.into_iter().map(Into::into).collect(),
            }),
            Predicate::Not(p) => Kind::Not(Box::new(proto::Negation {
                operand: Some(Box::new((*p).into())),
            })),
        };
        proto::Predicate { kind: Some(kind) }
    }
}

fn group_key_from_proto(g: proto::GroupKey) -> Result<GroupKey, ProtocolError> {
    use proto::group_key::Kind;
    match g.kind {
        None => Err(ProtocolError::Missing("group_by.kind")),
        Some(Kind::Column(c)) => Ok(GroupKey::Column(column_name("group_by.column", c)?)),
        Some(Kind::Bin(proto::Bin { column, width })) => {
            if !(width.is_finite() && width > 0.0) {
                return Err(invalid(
                    "group_by.bin.width",
                    format!("bin width must be a positive finite number, got {width}"),
                ));
            }
            Ok(GroupKey::Bin {
                column: column_name("group_by.bin.column", column)?,
                width,
            })
        }
    }
}

fn aggregate_from_proto(a: proto::Aggregate) -> Result<Aggregate, ProtocolError> {
    let proto::Aggregate {
        alias,
        kind,
        column,
        quantile,
    } = a;
    check_id("aggregates.alias", &alias, true)?;
    let kind = match proto::AggregateKind::try_from(kind) {
        Ok(proto::AggregateKind::Count) => AggregateKind::Count,
        Ok(proto::AggregateKind::Sum) => AggregateKind::Sum,
        Ok(proto::AggregateKind::Mean) => AggregateKind::Mean,
        Ok(proto::AggregateKind::Quantile) => {
            if !(quantile > 0.0 && quantile < 1.0) {
                return Err(invalid(
                    "aggregates.quantile",
                    format!("quantile must be strictly between 0 and 1, got {quantile}"),
                ));
            }
            AggregateKind::Quantile(quantile)
        }
        _ => {
            return Err(invalid(
                "aggregates.kind",
                format!("unknown aggregate code {kind}"),
            ));
        }
    };
    let column = if column.is_empty() {
        if kind != AggregateKind::Count {
            return Err(invalid(
                "aggregates.column",
                format!("{} needs a column", kind.name()),
            ));
        }
        None
    } else {
        Some(column_name("aggregates.column", column)?)
    };
    Ok(Aggregate {
        alias,
        kind,
        column,
    })
}

impl From<Aggregate> for proto::Aggregate {
    fn from(a: Aggregate) -> Self {
        let (kind, quantile) = match a.kind {
            AggregateKind::Count => (proto::AggregateKind::Count, 0.0),
            AggregateKind::Sum => (proto::AggregateKind::Sum, 0.0),
            AggregateKind::Mean => (proto::AggregateKind::Mean, 0.0),
            AggregateKind::Quantile(q) => (proto::AggregateKind::Quantile, q),
        };
        proto::Aggregate {
            alias: a.alias,
            kind: kind as i32,
            column: a.column.unwrap_or_default(),
            quantile,
        }
    }
}

impl From<GroupKey> for proto::GroupKey {
    fn from(g: GroupKey) -> Self {
        use proto::group_key::Kind;
        proto::GroupKey {
            kind: Some(match g {
                GroupKey::Column(c) => Kind::Column(c),
                GroupKey::Bin { column, width } => Kind::Bin(proto::Bin { column, width }),
            }),
        }
    }
}

impl TryFrom<proto::AggregateQuery> for SignedQuery {
    type Error = ProtocolError;

    fn try_from(q: proto::AggregateQuery) -> Result<Self, Self::Error> {
        let proto::AggregateQuery {
            query_id,
            requester_id,
            purpose,
            project_id,
            dataset,
            filter,
            group_by,
            aggregates,
            epsilon,
            issued_at_unix_ms,
            nonce,
            signature,
            federation_id,
            linkage,
            aggregation,
        } = q;
        check_id("federation_id", &federation_id, true)?;
        let aggregation = match proto::Aggregation::try_from(aggregation) {
            Ok(proto::Aggregation::Plain) => Aggregation::Plain,
            Ok(proto::Aggregation::SecureSum) => Aggregation::SecureSum,
            Err(_) => {
                return Err(invalid(
                    "aggregation",
                    format!("unknown aggregation {aggregation}"),
                ));
            }
        };
        check_id("query_id", &query_id, true)?;
        check_id("requester_id", &requester_id, true)?;
        check_id("project_id", &project_id, false)?;
        check_id("dataset", &dataset, true)?;
        let purpose = Purpose::try_from(purpose)?;
        if !(epsilon.is_finite() && epsilon >= MIN_EPSILON) {
            return Err(invalid(
                "epsilon",
                format!("must be a finite number of at least {MIN_EPSILON}, got {epsilon}"),
            ));
        }
        if issued_at_unix_ms <= 0 {
            return Err(ProtocolError::Missing("issued_at_unix_ms"));
        }
        check_nonce(&nonce)?;
        if group_by.len() > MAX_GROUP_KEYS {
            return Err(invalid(
                "group_by",
                format!(
                    "at most {MAX_GROUP_KEYS} group keys, got {}",
                    group_by.len()
                ),
            ));
        }
        if aggregates.is_empty() {
            return Err(ProtocolError::Missing("aggregates"));
        }
        if aggregates.len() > MAX_AGGREGATES {
            return Err(invalid(
                "aggregates",
                format!(
                    "at most {MAX_AGGREGATES} aggregates, got {}",
                    aggregates.len()
                ),
            ));
        }
        let aggregates: Vec<Aggregate> = aggregates
            .into_iter()
            .map(aggregate_from_proto)
            .collect::<Result<_, _>>()?;
        let mut aliases = std::collections::BTreeSet::new();
        for a in &aggregates {
            if !aliases.insert(a.alias.as_str()) {
                return Err(invalid(
                    "aggregates.alias",
                    format!("alias {:?} is used twice", a.alias),
                ));
            }
        }
        Ok(SignedQuery {
            body: QueryBody {
                federation_id,
                query_id,
                requester_id,
                purpose,
                project_id: (!project_id.is_empty()).then_some(project_id),
                dataset,
                filter: filter.map(Predicate::try_from).transpose()?,
                group_by: group_by
                    .into_iter()
                    .map(group_key_from_proto)
                    .collect::<Result<_, _>>()?,
                aggregates,
                epsilon,
                issued_at_unix_ms,
                nonce,
                linkage: linkage.map(linkage_from_proto).transpose()?,
                aggregation,
            },
            signature,
        })
    }
}

fn linkage_from_proto(l: proto::Linkage) -> Result<Linkage, ProtocolError> {
    let proto::Linkage {
        partner_dataset,
        partner_filter,
        negated,
        min_partner_rows,
    } = l;
    check_id("linkage.partner_dataset", &partner_dataset, true)?;
    if min_partner_rows > MAX_MIN_PARTNER_ROWS {
        return Err(invalid(
            "linkage.min_partner_rows",
            format!(
                "HAVING COUNT(*) >= k takes k of at most {MAX_MIN_PARTNER_ROWS}, got {min_partner_rows}"
            ),
        ));
    }
    Ok(Linkage {
        partner_dataset,
        partner_filter: partner_filter.map(Predicate::try_from).transpose()?,
        negated,
        min_partner_rows: min_partner_rows.max(1),
    })
}

impl From<Linkage> for proto::Linkage {
    fn from(l: Linkage) -> Self {
        let Linkage {
            partner_dataset,
            partner_filter,
            negated,
            min_partner_rows,
        } = l;
        proto::Linkage {
            partner_dataset,
            partner_filter: partner_filter.map(Into::into),
            negated,
            min_partner_rows,
        }
    }
}

impl From<SignedQuery> for proto::AggregateQuery {
    fn from(q: SignedQuery) -> Self {
        let SignedQuery { body, signature } = q;
        let QueryBody {
            federation_id,
            query_id,
            requester_id,
            purpose,
            project_id,
            dataset,
            filter,
            group_by,
            aggregates,
            epsilon,
            issued_at_unix_ms,
            nonce,
            linkage,
            aggregation,
        } = body;
        proto::AggregateQuery {
            query_id,
            requester_id,
            purpose: proto::Purpose::from(purpose) as i32,
            project_id: project_id.unwrap_or_default(),
            dataset,
            filter: filter.map(Into::into),
            group_by: group_by.into_iter().map(Into::into).collect(),
            aggregates: aggregates.into_iter().map(Into::into).collect(),
            epsilon,
            issued_at_unix_ms,
            nonce,
            signature,
            federation_id,
            linkage: linkage.map(Into::into),
            aggregation: match aggregation {
                Aggregation::Plain => proto::Aggregation::Plain,
                Aggregation::SecureSum => proto::Aggregation::SecureSum,
            } as i32,
        }
    }
}

impl TryFrom<proto::RequesterProof> for RequesterProof {
    type Error = ProtocolError;
    fn try_from(p: proto::RequesterProof) -> Result<Self, Self::Error> {
        let proto::RequesterProof {
            requester_id,
            project_id,
            issued_at_unix_ms,
            nonce,
            signature,
            federation_id,
            subject,
        } = p;
        check_id("proof.federation_id", &federation_id, true)?;
        check_id("proof.requester_id", &requester_id, true)?;
        check_id("proof.project_id", &project_id, false)?;
        check_id("proof.subject", &subject, false)?;
        if issued_at_unix_ms <= 0 {
            return Err(ProtocolError::Missing("proof.issued_at_unix_ms"));
        }
        check_nonce(&nonce)?;
        Ok(RequesterProof {
            federation_id,
            subject: (!subject.is_empty()).then_some(subject),
            requester_id,
            project_id: (!project_id.is_empty()).then_some(project_id),
            issued_at_unix_ms,
            nonce,
            signature,
        })
    }
}

impl From<RequesterProof> for proto::RequesterProof {
    fn from(p: RequesterProof) -> Self {
        proto::RequesterProof {
            federation_id: p.federation_id,
            subject: p.subject.unwrap_or_default(),
            requester_id: p.requester_id,
            project_id: p.project_id.unwrap_or_default(),
            issued_at_unix_ms: p.issued_at_unix_ms,
            nonce: p.nonce,
            signature: p.signature,
        }
    }
}
