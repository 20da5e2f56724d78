//! The canonical byte encoding that requesters sign. Protobuf bytes are not canonical
//! (field order, unknown fields, default elision), so signatures cover this instead.
//!
//! Format: a domain-separation tag, then every field in a fixed order; strings and
//! byte strings are length-prefixed (u32, big-endian), numbers are big-endian (f64 by
//! bit pattern), options and enums carry a tag byte. The encoding is injective: two
//! different bodies never produce the same bytes.

use crate::query::{
    Aggregate, AggregateKind, CompareOp, GroupKey, Literal, Predicate, ProofOp, Purpose, QueryBody,
    RequesterProof,
};
use sha2::{Digest, Sha256};

const QUERY_TAG: &[u8] = b"phm.v1.AggregateQuery\0";
const PROOF_TAG: &[u8] = b"phm.v1.RequesterProof\0";
const LINKAGE_TAG: &[u8] = b"phm.v1.Linkage\0";
const AGGREGATION_TAG: &[u8] = b"phm.v1.Aggregation\0";

#[derive(Default)]
struct Encoder(Vec<u8>);

impl Encoder {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: usize) {
        // Lengths are bounded far below u32::MAX by protocol limits; saturate rather
        // than wrap so an absurd length can never alias a small one.
        let v = u32::try_from(v).unwrap_or(u32::MAX);
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn f64(&mut self, v: f64) {
        self.0.extend_from_slice(&v.to_bits().to_be_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len());
        self.0.extend_from_slice(b);
    }
    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
    fn opt_str(&mut self, s: Option<&str>) {
        match s {
            None => self.u8(0),
            Some(s) => {
                self.u8(1);
                self.str(s);
            }
        }
    }
    fn purpose(&mut self, p: Purpose) {
        self.u8(match p {
            Purpose::DirectCare => 1,
            Purpose::Planning => 2,
            Purpose::Research => 3,
        });
    }
    fn literal(&mut self, l: &Literal) {
        match l {
            Literal::Text(s) => {
                self.u8(1);
                self.str(s);
            }
            Literal::Integer(i) => {
                self.u8(2);
                self.i64(*i);
            }
            Literal::Real(r) => {
                self.u8(3);
                self.f64(*r);
            }
            Literal::Boolean(b) => {
                self.u8(4);
                self.u8(u8::from(*b));
            }
        }
    }
    fn predicate(&mut self, p: &Predicate) {
        match p {
            Predicate::Compare { column, op, value } => {
                self.u8(1);
                self.str(column);
                self.u8(match op {
                    CompareOp::Eq => 1,
                    CompareOp::Ne => 2,
                    CompareOp::Lt => 3,
                    CompareOp::Le => 4,
                    CompareOp::Gt => 5,
                    CompareOp::Ge => 6,
                });
                self.literal(value);
            }
            Predicate::InList {
                column,
                values,
                negated,
            } => {
                self.u8(2);
                self.str(column);
                self.u32(values.len());
                values.iter().for_each(|v| self.literal(v));
                self.u8(u8::from(*negated));
            }
            Predicate::Between {
                column,
                low,
                high,
                negated,
            } => {
                self.u8(3);
                self.str(column);
                self.literal(low);
                self.literal(high);
                self.u8(u8::from(*negated));
            }
            Predicate::IsNull { column, negated } => {
                self.u8(4);
                self.str(column);
                self.u8(u8::from(*negated));
            }
            Predicate::All(ps) => {
                self.u8(5);
                self.u32(ps.len());
                ps.iter().for_each(|p| self.predicate(p));
            }
            Predicate::Any(ps) => {
                self.u8(6);
                self.u32(ps.len());
                ps.iter().for_each(|p| self.predicate(p));
            }
            Predicate::Not(p) => {
                self.u8(7);
                self.predicate(p);
            }
        }
    }
    fn group_key(&mut self, g: &GroupKey) {
        match g {
            GroupKey::Column(c) => {
                self.u8(1);
                self.str(c);
            }
            GroupKey::Bin { column, width } => {
                self.u8(2);
                self.str(column);
                self.f64(*width);
            }
        }
    }
    fn aggregate(&mut self, a: &Aggregate) {
        self.str(&a.alias);
        match a.kind {
            AggregateKind::Count => self.u8(1),
            AggregateKind::Sum => self.u8(2),
            AggregateKind::Mean => self.u8(3),
            AggregateKind::Quantile(q) => {
                self.u8(4);
                self.f64(q);
            }
        }
        self.opt_str(a.column.as_deref());
    }
}

impl QueryBody {
    /// The bytes a requester signs. Stable across versions of this crate: changing
    /// this function invalidates every outstanding signature.
    pub fn canonical_bytes(&self) -> Vec<u8> {
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
        } = self;
        let mut e = Encoder::default();
        e.0.extend_from_slice(QUERY_TAG);
        e.str(federation_id);
        e.str(query_id);
        e.str(requester_id);
        e.purpose(*purpose);
        e.opt_str(project_id.as_deref());
        e.str(dataset);
        match filter {
            None => e.u8(0),
            Some(p) => {
                e.u8(1);
                e.predicate(p);
            }
        }
        e.u32(group_by.len());
        group_by.iter().for_each(|g| e.group_key(g));
        e.u32(aggregates.len());
        aggregates.iter().for_each(|a| e.aggregate(a));
        e.f64(*epsilon);
        e.i64(*issued_at_unix_ms);
        e.bytes(nonce);
        // Appended only when present, so every query without linkage keeps the bytes
        // (and the pinned digest, and outstanding signatures) it always had. The tag
        // keeps the encoding injective: a non-linked encoding ends at the nonce.
        if let Some(l) = linkage {
            e.0.extend_from_slice(LINKAGE_TAG);
            e.str(&l.partner_dataset);
            match &l.partner_filter {
                None => e.u8(0),
                Some(p) => {
                    e.u8(1);
                    e.predicate(p);
                }
            }
            e.u8(u8::from(l.negated));
            e.u32(l.min_partner_rows as usize);
        }
        // Likewise appended only when not plain. Signed, so a coordinator cannot turn a
        // secure question into a plain one (each node would then release its own figure).
        match aggregation {
            crate::query::Aggregation::Plain => {}
            crate::query::Aggregation::SecureSum => {
                e.0.extend_from_slice(AGGREGATION_TAG);
                e.u8(1);
            }
        }
        e.0
    }

    /// SHA-256 of the canonical bytes, hex: identifies "the same question" in the
    /// release cache and the audit log.
    pub fn digest(&self) -> String {
        hex::encode(Sha256::digest(self.canonical_bytes()))
    }

    /// Digest of the question alone: the canonical encoding without query id, time
    /// and nonce. Two rewordings with the same content share it.
    pub fn content_digest(&self) -> String {
        let mut same = self.clone();
        same.query_id.clear();
        same.issued_at_unix_ms = 0;
        same.nonce.clear();
        same.digest()
    }
}

impl RequesterProof {
    /// The bytes signed for a Describe, Budget or GetResult request.
    pub fn canonical_bytes(&self, op: ProofOp) -> Vec<u8> {
        let mut e = Encoder::default();
        e.0.extend_from_slice(PROOF_TAG);
        e.str(op.as_str());
        e.str(&self.federation_id);
        e.str(&self.requester_id);
        e.opt_str(self.project_id.as_deref());
        e.opt_str(self.subject.as_deref());
        e.i64(self.issued_at_unix_ms);
        e.bytes(&self.nonce);
        e.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> QueryBody {
        QueryBody {
            federation_id: "ics-test".into(),
            query_id: "q-1".into(),
            requester_id: "dsu".into(),
            purpose: Purpose::Planning,
            project_id: None,
            dataset: "gp_patients".into(),
            filter: Some(Predicate::All(vec![
                Predicate::Compare {
                    column: "age".into(),
                    op: CompareOp::Ge,
                    value: Literal::Integer(18),
                },
                Predicate::InList {
                    column: "sex".into(),
                    values: vec![Literal::Text("F".into()), Literal::Text("M".into())],
                    negated: false,
                },
                Predicate::Not(Box::new(Predicate::IsNull {
                    column: "bmi".into(),
                    negated: false,
                })),
                Predicate::Between {
                    column: "bmi".into(),
                    low: Literal::Real(18.5),
                    high: Literal::Real(40.0),
                    negated: true,
                },
                Predicate::Any(vec![Predicate::Compare {
                    column: "diabetes".into(),
                    op: CompareOp::Eq,
                    value: Literal::Boolean(true),
                }]),
            ])),
            group_by: vec![
                GroupKey::Column("imd_quintile".into()),
                GroupKey::Bin {
                    column: "age".into(),
                    width: 10.0,
                },
            ],
            aggregates: vec![
                Aggregate {
                    alias: "n".into(),
                    kind: AggregateKind::Count,
                    column: None,
                },
                Aggregate {
                    alias: "mean_bmi".into(),
                    kind: AggregateKind::Mean,
                    column: Some("bmi".into()),
                },
            ],
            epsilon: 0.5,
            issued_at_unix_ms: 1_790_000_000_000,
            nonce: vec![7; 16],
            linkage: None,
            aggregation: Default::default(),
        }
    }

    #[test]
    fn same_query_gives_same_bytes() {
        assert_eq!(sample().canonical_bytes(), sample().canonical_bytes());
        assert_eq!(
            sample().clone().canonical_bytes(),
            sample().canonical_bytes()
        );
    }

    #[test]
    fn bytes_are_pinned() {
        // Pins the format: if this digest changes, every signature in the field breaks.
        // (Changed once, deliberately, when the federation id became part of what is
        // signed: signatures made before that are no longer valid anywhere.)
        let bytes = sample().canonical_bytes();
        assert!(bytes.starts_with(QUERY_TAG));
        assert_eq!(bytes.len(), 277, "canonical layout changed");
        assert_eq!(
            sample().digest(),
            "8b3b235ee76a3a939f81aa7b8b4c6861e1ddacbb8824d5e7b39a1a4ede5e5ab4"
        );
    }

    #[test]
    fn every_field_change_changes_bytes() {
        let base = sample().canonical_bytes();
        let mut variants: Vec<(&str, QueryBody)> = Vec::new();
        let mut push = |name, f: &dyn Fn(&mut QueryBody)| {
            let mut q = sample();
            f(&mut q);
            variants.push((name, q));
        };
        push("federation_id", &|q| q.federation_id.push('x'));
        push("query_id", &|q| q.query_id.push('x'));
        push("requester_id", &|q| q.requester_id = "dsv".into());
        push("purpose", &|q| q.purpose = Purpose::Research);
        push("project_id", &|q| q.project_id = Some("p1".into()));
        push("project_id empty", &|q| q.project_id = Some(String::new()));
        push("dataset", &|q| q.dataset = "acute_admissions".into());
        push("filter removed", &|q| q.filter = None);
        push("filter literal", &|q| {
            if let Some(Predicate::All(ps)) = &mut q.filter {
                ps[0] = Predicate::Compare {
                    column: "age".into(),
                    op: CompareOp::Ge,
                    value: Literal::Integer(19),
                };
            }
        });
        push("filter op", &|q| {
            if let Some(Predicate::All(ps)) = &mut q.filter {
                ps[0] = Predicate::Compare {
                    column: "age".into(),
                    op: CompareOp::Gt,
                    value: Literal::Integer(18),
                };
            }
        });
        push("literal type", &|q| {
            if let Some(Predicate::All(ps)) = &mut q.filter {
                ps[0] = Predicate::Compare {
                    column: "age".into(),
                    op: CompareOp::Ge,
                    value: Literal::Real(18.0),
                };
            }
        });
        push("negation", &|q| {
            if let Some(Predicate::All(ps)) = &mut q.filter {
                ps[3] = Predicate::Between {
                    column: "bmi".into(),
                    low: Literal::Real(18.5),
                    high: Literal::Real(40.0),
                    negated: false,
                };
            }
        });
        push("and->or", &|q| {
            if let Some(Predicate::All(ps)) = &q.filter {
                q.filter = Some(Predicate::Any(ps.clone()));
            }
        });
        push("group order", &|q| q.group_by.reverse());
        push("bin width", &|q| {
            q.group_by[1] = GroupKey::Bin {
                column: "age".into(),
                width: 5.0,
            }
        });
        push("aggregate kind", &|q| {
            q.aggregates[1].kind = AggregateKind::Sum
        });
        push("aggregate alias", &|q| q.aggregates[0].alias = "m".into());
        push("aggregate column", &|q| {
            q.aggregates[1].column = Some("hba1c".into())
        });
        push("epsilon", &|q| q.epsilon = 0.5000001);
        push("issued_at", &|q| q.issued_at_unix_ms += 1);
        push("nonce", &|q| q.nonce[15] = 8);
        let mut seen = std::collections::BTreeSet::new();
        seen.insert(base.clone());
        for (name, q) in variants {
            let b = q.canonical_bytes();
            assert_ne!(b, base, "changing {name} did not change the bytes");
            assert!(
                seen.insert(b),
                "changing {name} collided with another variant"
            );
        }
    }

    #[test]
    fn length_prefix_prevents_field_shifting() {
        // "ab"+"c" and "a"+"bc" must differ.
        let mut a = sample();
        a.query_id = "ab".into();
        a.requester_id = "c".into();
        let mut b = sample();
        b.query_id = "a".into();
        b.requester_id = "bc".into();
        assert_ne!(a.canonical_bytes(), b.canonical_bytes());
    }

    #[test]
    fn content_digest_ignores_id_time_and_nonce_only() {
        let a = sample();
        let mut b = sample();
        b.query_id = "another".into();
        b.nonce = vec![1; 16];
        b.issued_at_unix_ms += 5_000;
        assert_eq!(a.content_digest(), b.content_digest());
        assert_ne!(a.digest(), b.digest());
        b.epsilon = 1.0;
        assert_ne!(a.content_digest(), b.content_digest());
    }

    #[test]
    fn proof_bytes_bind_operation() {
        let p = RequesterProof {
            federation_id: "ics-test".into(),
            subject: None,
            requester_id: "dsu".into(),
            project_id: None,
            issued_at_unix_ms: 1,
            nonce: vec![0; 16],
            signature: vec![],
        };
        assert_ne!(
            p.canonical_bytes(ProofOp::Describe),
            p.canonical_bytes(ProofOp::Budget)
        );
        assert_ne!(
            p.canonical_bytes(ProofOp::Budget),
            p.canonical_bytes(ProofOp::GetResult)
        );
    }

    #[test]
    fn proof_bytes_bind_federation_and_subject() {
        let p = RequesterProof {
            federation_id: "ics-a".into(),
            subject: Some("q-1".into()),
            requester_id: "dsu".into(),
            project_id: None,
            issued_at_unix_ms: 1,
            nonce: vec![0; 16],
            signature: vec![],
        };
        let base = p.canonical_bytes(ProofOp::GetResult);
        let other_fed = RequesterProof {
            federation_id: "ics-b".into(),
            ..p.clone()
        };
        let other_subject = RequesterProof {
            subject: Some("q-2".into()),
            ..p.clone()
        };
        let no_subject = RequesterProof {
            subject: None,
            ..p.clone()
        };
        for (what, q) in [
            ("federation", other_fed),
            ("subject", other_subject),
            ("no subject", no_subject),
        ] {
            assert_ne!(q.canonical_bytes(ProofOp::GetResult), base, "{what}");
        }
    }
}
