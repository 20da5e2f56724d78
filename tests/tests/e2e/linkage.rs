//! Linked questions across partners, end to end: through the real coordinator (answers
//! against the synthetic truth, what the total says), and with this test standing in
//! for the coordinator as a recording, meddling relay between a real GP node and a real
//! trust node (what the relay can see, what each node spends before any data frame, the
//! release cache, the one-session rule, and tampered frames refused with an audit entry
//! and nothing sent after).

use crate::rt;
use phm_e2e::client::{self, body, count, sign};
use phm_e2e::{Federation, Ics, phm};
use phm_proto::proto;
use phm_proto::proto::link_down::Step as Down;
use phm_proto::proto::link_up::Step as Up;
use phm_proto::query::Linkage;
use phm_proto::{CompareOp, GroupKey, Literal, Predicate, Purpose, QueryBody};
use sha2::Digest as _;
use std::collections::HashSet;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// μ of the clamped dummy-match noise at ε = 1 and the synth policies' δ: every
/// session's released count is within ±μ of its true count, always (the noise is
/// clamped), and its standard deviation is about 1.5.
const MU_AT_EPSILON_1: f64 = 24.0;

const PLANNING_1: &[&str] = &["--purpose", "planning", "--epsilon", "1"];

#[test]
fn linked_questions_through_the_coordinator_match_the_pairwise_truth() {
    let fed = Federation::start(20_000, 31, None);
    let reference = phm_devkit::synth::load_reference(&fed.ics.root).unwrap();
    let gps = fed.ics.nodes_serving("gp_patients").len();
    let trusts = fed.ics.nodes_serving("acute_admissions").len();
    assert_eq!(trusts, 2);
    for q in phm_devkit::questions::LINKED {
        let r = fed.query_json("dsu", PLANNING_1, q.sql);
        let truth = reference
            .questions
            .iter()
            .find(|x| x.id == q.id)
            .and_then(|x| x.linked.as_ref())
            .unwrap_or_else(|| panic!("no linked reference for {}", q.id));
        let anchors = if q.sql.contains("FROM gp_patients") {
            gps
        } else {
            1
        };
        let sessions = anchors * trusts;
        let answered = r["coverage"]["answered"].as_array().unwrap().len();
        assert_eq!(
            answered, sessions,
            "every (anchor, trust) session answered: {r}"
        );
        let note = r["total_note"].as_str().unwrap();
        assert!(note.contains("Linked on NHS number"), "{note}");
        assert!(note.contains("not counted"), "{note}");
        assert_eq!(r["total_kind"], "sum_of_partner_counts", "{r}");
        let mut checked = 0;
        for row in r["rows"].as_array().unwrap() {
            let key: Vec<String> = row["group"]
                .as_object()
                .unwrap()
                .values()
                .map(|v| v.as_str().unwrap().to_string())
                .collect();
            let (alias, cell) = row["values"].as_object().unwrap().iter().next().unwrap();
            if cell["suppressed"].as_bool().unwrap() {
                continue;
            }
            let exact = truth
                .pairwise_rows
                .iter()
                .find(|t| t.key == key)
                .and_then(|t| t.values.get(alias))
                .copied()
                .unwrap();
            let estimate = cell["estimate"].as_f64().unwrap();
            // Each session's error is clamped to ±μ; the display rounds to 5.
            let bound = MU_AT_EPSILON_1 * sessions as f64 + 5.0;
            assert!(
                (estimate - exact).abs() <= bound,
                "{} {key:?}: {estimate} vs exact {exact} (bound {bound})",
                q.id
            );
            // And far tighter in practice: 12 standard deviations fail with probability
            // below 1e-7 for a sum of discrete Laplace draws.
            let sd = cell["noise_scale"].as_f64().unwrap();
            assert!(
                (estimate - exact).abs() <= 12.0 * sd + 5.0,
                "{} {key:?}: {estimate} vs exact {exact} (sd {sd})",
                q.id
            );
            checked += 1;
        }
        // The frequent attenders of a 20,000-person ICS are too few to show.
        if q.id == phm_devkit::questions::LINKED_GP_EMERGENCY_BY_IMD.id {
            assert!(checked > 0, "{}: every figure was suppressed: {r}", q.id);
        }
    }

    // What is refused is explained with a caret before anything is sent.
    let bad = "SELECT COUNT(*) AS n FROM gp_patients g WHERE EXISTS (SELECT 1 FROM acute_admissions a WHERE a.nhs_number = g.person)";
    let (code, out, err) = phm(&[
        "query",
        "--coordinator",
        &fed.coordinator_url(),
        "--federation",
        phm_e2e::FEDERATION_ID,
        "--key",
        &fed.ics.key("dsu").display().to_string(),
        "--purpose",
        "planning",
        bad,
    ]);
    assert_ne!(code, 0, "{out}");
    assert!(err.contains('^') && err.contains("person"), "{err}");

    // `phm policy explain` covers linked questions for the side each policy holds.
    let gp = &fed.ics.nodes_serving("gp_patients")[0];
    let q = phm_devkit::questions::LINKED_GP_EMERGENCY_BY_IMD;
    for (id, side) in [(gp.as_str(), "anchor"), ("RW1", "partner")] {
        let policy = fed.ics.policy_path(id).display().to_string();
        let (code, out, err) = phm(&[
            "policy",
            "explain",
            "--policy",
            &policy,
            "--requester",
            "dsu",
            "--purpose",
            "planning",
            "--epsilon",
            "1",
            q.sql,
        ]);
        assert_eq!(code, 0, "{out}\n{err}");
        assert!(
            out.contains(&format!("ALLOW: this node may take the {side} side")),
            "{id}: {out}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// The test as the relay.

fn linked_query(epsilon: f64) -> QueryBody {
    let mut q = body(
        "dsu",
        Purpose::Planning,
        "gp_patients",
        vec![GroupKey::Column("imd_quintile".into())],
        vec![count("patients")],
        None,
        epsilon,
    );
    q.linkage = Some(Linkage {
        partner_dataset: "acute_admissions".into(),
        partner_filter: Some(Predicate::Compare {
            column: "method".into(),
            op: CompareOp::Eq,
            value: Literal::Text("emergency".into()),
        }),
        negated: false,
        min_partner_rows: 1,
    });
    q
}

/// One end of a Link stream, as the coordinator holds it.
struct End {
    tx: mpsc::Sender<proto::LinkUp>,
    rx: tonic::Streaming<proto::LinkDown>,
}

async fn open(
    ch: tonic::transport::Channel,
    query: &proto::AggregateQuery,
    role: proto::LinkRole,
    anchor: &str,
    partner: &str,
    nonce: &[u8],
) -> Result<End, tonic::Status> {
    let (tx, rx) = mpsc::channel(64);
    tx.send(proto::LinkUp {
        step: Some(Up::Open(proto::LinkOpen {
            query: Some(query.clone()),
            role: role as i32,
            anchor: anchor.into(),
            partner: partner.into(),
            session_nonce: nonce.to_vec(),
        })),
    })
    .await
    .unwrap();
    let mut c = proto::node_service_client::NodeServiceClient::new(ch);
    let resp = c.link(ReceiverStream::new(rx)).await?;
    Ok(End {
        tx,
        rx: resp.into_inner(),
    })
}

async fn first(end: &mut End) -> Result<Down, tonic::Status> {
    end.rx
        .message()
        .await?
        .and_then(|m| m.step)
        .ok_or_else(|| tonic::Status::internal("the node closed the stream without a message"))
}

async fn send(end: &End, step: Up) {
    // A node that already refused has closed its side; the test reads its status.
    let _ = end.tx.send(proto::LinkUp { step: Some(step) }).await;
}

/// What a relayed session came to.
#[derive(Default)]
struct Session {
    /// Every frame relayed, both ways, in order.
    frames: Vec<proto::RelayFrame>,
    anchor: Option<Result<proto::AggregateResult, tonic::Status>>,
    partner: Option<Result<(), tonic::Status>>,
    /// What each node (anchor, partner) had spent when it said ready, before any
    /// frame of the session was sent by anyone.
    spent_at_ready: Vec<f64>,
}

/// How the relay meddles: given the direction (true: partner → anchor) and the frame,
/// the frames to deliver instead (none to drop it). `tampered` is set once it has.
type Meddle<'a> = &'a mut dyn FnMut(bool, &proto::RelayFrame, &mut bool) -> Vec<proto::RelayFrame>;

struct Nodes {
    anchor_ch: tonic::transport::Channel,
    partner_ch: tonic::transport::Channel,
    anchor: String,
    partner: String,
    dsu: ed25519_dalek::SigningKey,
}

/// The epsilon `requester:dsu` has spent at the node behind `ch`.
async fn spent(ch: tonic::transport::Channel, dsu: &ed25519_dalek::SigningKey) -> f64 {
    let b = client::node_budget(ch, "dsu", None, dsu).await.unwrap();
    client::ledger(&b, "requester:dsu").unwrap().epsilon_spent
}

async fn relay(nodes: &Nodes, query: &proto::AggregateQuery, meddle: Meddle<'_>) -> Session {
    let nonce: Vec<u8> = (0..32).map(|_| rand::random::<u8>()).collect();
    let mut out = Session::default();
    let mut a = open(
        nodes.anchor_ch.clone(),
        query,
        proto::LinkRole::Anchor,
        &nodes.anchor,
        &nodes.partner,
        &nonce,
    )
    .await
    .unwrap();
    let ta = match first(&mut a).await.unwrap() {
        Down::Ready(r) => {
            out.spent_at_ready
                .push(spent(nodes.anchor_ch.clone(), &nodes.dsu).await);
            r.terms.unwrap()
        }
        Down::Result(r) => {
            out.anchor = Some(Ok(r));
            return out;
        }
        other => panic!("anchor opened with {other:?}"),
    };
    let mut p = open(
        nodes.partner_ch.clone(),
        query,
        proto::LinkRole::Partner,
        &nodes.anchor,
        &nodes.partner,
        &nonce,
    )
    .await
    .unwrap();
    let tp = match first(&mut p).await {
        Ok(Down::Ready(r)) => {
            out.spent_at_ready
                .push(spent(nodes.partner_ch.clone(), &nodes.dsu).await);
            r.terms.unwrap()
        }
        Ok(other) => panic!("partner opened with {other:?}"),
        Err(status) => {
            out.partner = Some(Err(status));
            return out;
        }
    };
    send(&a, Up::PeerTerms(tp)).await;
    send(&p, Up::PeerTerms(ta)).await;
    let mut tampered = false;
    let (mut a_open, mut p_open) = (true, true);
    while a_open || p_open {
        tokio::select! {
            m = a.rx.message(), if a_open => match m {
                Ok(Some(proto::LinkDown { step: Some(Down::Frame(f)) })) => {
                    out.frames.push(f.clone());
                    for g in meddle(false, &f, &mut tampered) { send(&p, Up::Frame(g)).await; }
                }
                Ok(Some(proto::LinkDown { step: Some(Down::Result(r)) })) => {
                    out.anchor = Some(Ok(r));
                    a_open = false;
                }
                Ok(other) => panic!("anchor sent {other:?}"),
                Err(status) => { out.anchor = Some(Err(status)); a_open = false; }
            },
            m = p.rx.message(), if p_open => match m {
                Ok(Some(proto::LinkDown { step: Some(Down::Frame(f)) })) => {
                    out.frames.push(f.clone());
                    for g in meddle(true, &f, &mut tampered) { send(&a, Up::Frame(g)).await; }
                }
                Ok(Some(proto::LinkDown { step: Some(Down::Finished(_)) })) | Ok(None) => {
                    out.partner.get_or_insert(Ok(()));
                    p_open = false;
                }
                Ok(other) => panic!("partner sent {other:?}"),
                Err(status) => { out.partner = Some(Err(status)); p_open = false; }
            },
        }
        let failed = |r: Option<bool>| r == Some(true);
        if failed(out.anchor.as_ref().map(Result::is_err))
            || failed(out.partner.as_ref().map(Result::is_err))
        {
            // A node refused: the relay gives up on the session, as the coordinator
            // does, and the other node sees its stream close.
            break;
        }
    }
    out
}

fn honest() -> impl FnMut(bool, &proto::RelayFrame, &mut bool) -> Vec<proto::RelayFrame> {
    |_, f, _| vec![f.clone()]
}

/// Every 10-digit number of the official test range with a valid check digit: every
/// synthetic NHS number is one of them.
fn candidate_numbers() -> Vec<String> {
    (999_000_000u32..=999_999_999)
        .filter_map(phm_link::with_check_digit)
        .map(|n| {
            n.digits()
                .iter()
                .map(|&d| char::from(d))
                .collect::<String>()
        })
        .collect()
}

/// SHA-256, SHA-512 (first 32 bytes) and compress(H(x)) of every candidate number.
fn testable_values(numbers: &[String]) -> HashSet<[u8; 32]> {
    let chunks: Vec<&[String]> = numbers.chunks(numbers.len().div_ceil(2)).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = chunks
            .iter()
            .map(|chunk| {
                s.spawn(move || {
                    let mut out = Vec::with_capacity(chunk.len() * 3);
                    for n in *chunk {
                        out.push(sha2::Sha256::digest(n.as_bytes()).into());
                        let long = sha2::Sha512::digest(n.as_bytes());
                        let mut first = [0u8; 32];
                        first.copy_from_slice(&long[..32]);
                        out.push(first);
                        let x = phm_link::NhsNumber::parse(n).unwrap();
                        out.push(x.to_point().compress().to_bytes());
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    })
}

fn denial_text(status: &tonic::Status) -> String {
    client::denial_text(status)
}

/// The node's audit log entries for linkage sessions.
fn link_audit(ics: &Ics, id: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(ics.root.join(id).join("state/audit.log")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["rpc"] == "link")
        .collect()
}

#[test]
fn a_recording_relay_sees_nothing_testable_and_tampered_frames_are_refused() {
    let ics = Ics::synth(8_000, 33);
    let gp = ics.nodes_serving("gp_patients")[0].clone();
    let fed = Federation::start_nodes(ics, &[gp.clone(), "RW1".to_string()], false);
    let certs = fed.ics.certs();
    let dsu = client::load_key(&fed.ics.key("dsu"));
    let endpoint = |id: &str| {
        fed.nodes
            .iter()
            .find(|n| n.id == id)
            .map(|n| n.endpoint())
            .unwrap()
    };
    let numbers = candidate_numbers();
    rt().block_on(async {
        let relay_cert = Some(client::RELAY_CERT);
        let nodes = Nodes {
            anchor_ch: client::channel(&endpoint(&gp), &certs, relay_cert)
                .await
                .unwrap(),
            partner_ch: client::channel(&endpoint("RW1"), &certs, relay_cert)
                .await
                .unwrap(),
            anchor: gp.clone(),
            partner: "RW1".into(),
            dsu: dsu.clone(),
        };
        let (a0, p0) = (
            spent(nodes.anchor_ch.clone(), &dsu).await,
            spent(nodes.partner_ch.clone(), &dsu).await,
        );

        // 1. An honest session, every frame recorded. Both nodes had spent when they
        // said ready, which is before any frame of the session exists (a node seals
        // its first frame only once it has the other's terms, which the relay sends
        // after both are ready).
        let clean = sign(linked_query(0.5), &dsu);
        let s = relay(&nodes, &clean, &mut honest()).await;
        assert_eq!(s.spent_at_ready.len(), 2);
        assert!(
            (s.spent_at_ready[0] - a0 - 0.5).abs() < 1e-9,
            "{:?}",
            s.spent_at_ready
        );
        assert!(
            (s.spent_at_ready[1] - p0 - 0.5).abs() < 1e-9,
            "{:?}",
            s.spent_at_ready
        );
        let result = s.anchor.unwrap().unwrap();
        assert_eq!(result.rows.len(), 5, "every IMD quintile is released");
        assert!(s.partner.unwrap().is_ok());
        assert!(s.frames.len() >= 3, "L, F and R at least");
        let p1 = spent(nodes.partner_ch.clone(), &dsu).await;
        // The spend is in the audit log of both nodes, before their frames (the
        // session is audited with its ledger; the ledger is flushed before "ready").
        for id in [gp.as_str(), "RW1"] {
            let e = link_audit(&fed.ics, id);
            let last = e.last().unwrap();
            assert_eq!(last["decision"], "allowed", "{last}");
            assert_eq!(last["epsilon_spent"], 0.5, "{last}");
        }

        // What the relay saw: no NHS number in ASCII, no SHA-256 or SHA-512 of one, and no
        // H(x) of any candidate number (every synthetic number is a candidate), at any
        // offset of anything it relayed.
        let testable = testable_values(&numbers);
        let mut bytes: Vec<u8> = Vec::new();
        for f in &s.frames {
            for part in [
                &f.enc,
                &f.ciphertext,
                &f.signature,
                &f.session_id,
                &f.query_digest,
            ] {
                bytes.extend_from_slice(part);
            }
            bytes.extend_from_slice(f.from.as_bytes());
            bytes.extend_from_slice(f.to.as_bytes());
        }
        for w in bytes.windows(32) {
            let w: [u8; 32] = w.try_into().unwrap();
            assert!(!testable.contains(&w), "a testable value crossed the relay");
        }
        let ascii: HashSet<&[u8]> = numbers.iter().map(|n| n.as_bytes()).collect();
        for w in bytes.windows(10) {
            assert!(
                !ascii.contains(w),
                "an NHS number in ASCII crossed the relay"
            );
        }

        // 2. The same signed query again: the anchor answers from its cache at once,
        // no frames, no spend; and the partner refuses a second session for it.
        let again = relay(&nodes, &clean, &mut honest()).await;
        assert!(again.frames.is_empty());
        let cached = again.anchor.unwrap().unwrap();
        assert!(cached.cached);
        assert_eq!(cached.rows, result.rows);
        let nonce = [9u8; 32];
        let partner_again = |q: proto::AggregateQuery| {
            let ch = nodes.partner_ch.clone();
            let gp = gp.clone();
            async move {
                let mut p = open(ch, &q, proto::LinkRole::Partner, &gp, "RW1", &nonce)
                    .await
                    .unwrap();
                denial_text(&first(&mut p).await.unwrap_err())
            }
        };
        // The very message again is a replay; the same question re-signed (a new
        // nonce, same query id) is a second session, refused as such.
        let replayed = partner_again(clean.clone()).await;
        assert!(replayed.contains("already used"), "{replayed}");
        let mut resigned = phm_proto::SignedQuery::try_from(clean.clone())
            .unwrap()
            .body;
        resigned.nonce = (0..16).map(|_| rand::random::<u8>()).collect();
        resigned.issued_at_unix_ms += 1;
        let second = partner_again(sign(resigned, &dsu)).await;
        assert!(second.contains("second session"), "{second}");
        assert!((spent(nodes.partner_ch.clone(), &dsu).await - p1).abs() < 1e-9);

        // 3. Meddling: each attack on a fresh query is refused by the node it reaches,
        // which then sends nothing more and audits the refusal.
        let recorded = s.frames.clone();
        let from_partner = |f: &proto::RelayFrame| f.from == "RW1";
        type Attack = Box<dyn FnMut(bool, &proto::RelayFrame, &mut bool) -> Vec<proto::RelayFrame>>;
        let attacks: Vec<(&str, bool, Attack)> = vec![
            (
                "a flipped ciphertext byte",
                true,
                Box::new(|to_anchor, f, t| {
                    let mut g = f.clone();
                    if to_anchor && !*t {
                        *t = true;
                        if let Some(b) = g.ciphertext.get_mut(40) {
                            *b ^= 1;
                        }
                    }
                    vec![g]
                }),
            ),
            (
                "a replayed frame",
                true,
                Box::new(|to_anchor, f, t| {
                    if to_anchor && !*t {
                        *t = true;
                        return vec![f.clone(), f.clone()];
                    }
                    vec![f.clone()]
                }),
            ),
            (
                "a frame signed by another node",
                true,
                Box::new({
                    let sig = recorded
                        .iter()
                        .find(|f| !from_partner(f))
                        .unwrap()
                        .signature
                        .clone();
                    move |to_anchor, f, t| {
                        let mut g = f.clone();
                        if to_anchor && !*t {
                            *t = true;
                            g.signature = sig.clone();
                        }
                        vec![g]
                    }
                }),
            ),
            (
                "a frame from another session",
                true,
                Box::new({
                    let old = recorded.iter().find(|f| from_partner(f)).unwrap().clone();
                    move |to_anchor, f, t| {
                        if to_anchor && !*t {
                            *t = true;
                            return vec![old.clone()];
                        }
                        vec![f.clone()]
                    }
                }),
            ),
            (
                "a reply delivered before the blinded set (reordered)",
                true,
                Box::new({
                    let mut held: Vec<proto::RelayFrame> = Vec::new();
                    move |to_anchor, f, t| {
                        if !to_anchor {
                            return vec![f.clone()];
                        }
                        if f.round == 1 {
                            held.push(f.clone());
                            return vec![];
                        }
                        *t = true;
                        let mut out = vec![f.clone()];
                        out.append(&mut held);
                        out
                    }
                }),
            ),
            (
                "a tampered anchor set (the partner sends no reply)",
                false,
                Box::new(|to_anchor, f, t| {
                    let mut g = f.clone();
                    if !to_anchor && !*t {
                        *t = true;
                        if let Some(b) = g.ciphertext.get_mut(40) {
                            *b ^= 1;
                        }
                    }
                    vec![g]
                }),
            ),
        ];
        for (what, at_anchor, mut attack) in attacks {
            let before = (
                link_audit(&fed.ics, &gp).len(),
                link_audit(&fed.ics, "RW1").len(),
            );
            let q = sign(linked_query(0.5), &dsu);
            let s = relay(&nodes, &q, attack.as_mut()).await;
            let (refused_by, status) = if at_anchor {
                (
                    gp.as_str(),
                    s.anchor.expect("the anchor's outcome").expect_err(what),
                )
            } else {
                (
                    "RW1",
                    s.partner.expect("the partner's outcome").expect_err(what),
                )
            };
            let text = denial_text(&status);
            assert!(
                text.contains("refused") || text.contains("malformed"),
                "{what}: {text}"
            );
            if !at_anchor {
                assert!(
                    !s.frames.iter().any(|f| from_partner(f) && f.round == 2),
                    "{what}: the partner sent its reply anyway"
                );
            }
            // Nothing follows a refusal: an anchor sends only its set (before it sees any
            // frame) and releases nothing; a partner sends no reply.
            if at_anchor {
                assert!(
                    s.frames
                        .iter()
                        .filter(|f| !from_partner(f))
                        .all(|f| f.round == 1),
                    "{what}: the anchor sent more than its set"
                );
            }
            // Wait for the refusing node's audit entry (written as the session ends).
            let index = if at_anchor { 0 } else { 1 };
            let entry = phm_e2e::wait_for(what, std::time::Duration::from_secs(10), || {
                let e = link_audit(&fed.ics, refused_by);
                (e.len() > [before.0, before.1][index])
                    .then(|| e.last().cloned())
                    .flatten()
            });
            assert_eq!(entry["decision"], "refused", "{what}: {entry}");
            assert_eq!(entry["query_id"], q.query_id, "{what}: {entry}");
        }
    });

    // Nothing in either node's log or audit log is a scalar, a point or a noise draw:
    // every 64-hex-digit token is a digest or hash chain value the audit log defines,
    // and no 32-byte base64 value appears but the public keys the node prints.
    for id in [gp.as_str(), "RW1"] {
        let audit = std::fs::read_to_string(fed.ics.root.join(id).join("state/audit.log")).unwrap();
        let mut known: HashSet<String> = HashSet::new();
        for line in audit.lines() {
            let e: serde_json::Value = serde_json::from_str(line).unwrap();
            for k in ["hash", "prev_hash", "query_digest", "policy_version"] {
                if let Some(v) = e[k].as_str() {
                    known.insert(v.to_string());
                }
            }
        }
        let log = fed.ics.root.join("logs").join(format!("{id}.log"));
        let log = std::fs::read_to_string(log).unwrap_or_default();
        for (what, text) in [("audit log", &audit), ("log", &log)] {
            for token in text.split(|c: char| !c.is_ascii_hexdigit()) {
                if token.len() >= 64 {
                    assert!(
                        known.contains(token),
                        "{id} {what}: unexplained value {token}"
                    );
                }
            }
            assert!(
                !text.contains("noise draw") && !text.contains("scalar"),
                "{id} {what}"
            );
        }
    }
}
