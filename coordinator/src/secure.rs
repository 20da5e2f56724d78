//! The coordinator's side of one secure-aggregation session (secagg/PROTOCOL.md): open a
//! SecureAggregate stream to every node serving the dataset, read each node's terms,
//! form the cohort and its parameters (the accountant's calibration for the strictest
//! member), then run `phm_secagg::Server` through rounds R0–R4, forwarding each
//! ciphertext only to its addressee, and decode the survivors' total. The coordinator
//! holds only masked inputs: no partner's own figure exists here, before or after.
//!
//! A node that refuses, fails, sends something the server rejects or stays silent for a
//! round's timeout is dropped from that round on (its stream is closed, which ends its
//! session); the server refuses to unmask a total of fewer than t_noise survivors, so a
//! dropout can cost accuracy or the answer, never privacy.

use crate::combine::{Expected, MeanNoise, NodeCell, NodeRow};
use crate::fanout::{CallOutcome, NodeClient, classify};
use crate::model::NodeOutcome;
use futures::future::join_all;
use phm_proto::proto;
use phm_proto::proto::sec_agg_down::Step as Down;
use phm_proto::proto::sec_agg_up::Step as Up;
use phm_proto::result::MeanParts;
use phm_proto::{AggregateKind, Denial, DenialReason, QueryBody};
use phm_relay::{NodeId, Registry, VerifyingKey};
use phm_secagg::accountant::{self, Cohort, NoiseTarget};
use phm_secagg::{Begin, Server, SessionParams, Total, wire};
use prost::Message as _;
use rand::RngCore as _;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::combine::{Dist, Noise, Shape};

/// What the coordinator needs to run sessions (from `[secure_aggregation]`).
#[derive(Debug, Clone)]
pub struct SecureSetup {
    pub registry: Registry,
    pub registry_key: VerifyingKey,
    pub min_survivors: f64,
    pub round_timeout: Duration,
}

/// How one node's part in the session ended.
#[derive(Debug, Clone)]
pub struct Member {
    pub index: usize,
    pub outcome: NodeOutcome,
    pub reason: Option<DenialReason>,
    pub message: String,
    /// Its declared registered population (from its terms), 0 if unknown.
    pub population: f64,
    /// Epsilon and delta it charged (0 unless it committed).
    pub epsilon: f64,
    pub delta: f64,
}

/// The decoded system total, laid out for combining.
#[derive(Debug, Clone)]
pub struct SecureTotal {
    pub rows: Vec<NodeRow>,
    pub min_reportable_count: f64,
    pub rounded: bool,
    pub survivors: u32,
    pub cohort: u32,
    pub t_noise: u32,
    /// Predicted standard deviation of each COUNT (persons) in secure mode, and in
    /// plain mode with every node adding its own discrete Laplace or Gaussian noise.
    pub count_sd_secure: f64,
    pub count_sd_plain_laplace: f64,
    pub count_sd_plain_gaussian: f64,
    pub epsilon: f64,
    pub delta: f64,
}

/// The session's result.
#[derive(Debug)]
pub struct SessionOutcome {
    pub members: Vec<Member>,
    pub total: Result<SecureTotal, String>,
    /// Application payload exchanged with each node (by registry index), whatever its
    /// outcome: what an operator sizes links by, and what BENCHMARKS.md reports.
    pub traffic: BTreeMap<usize, Traffic>,
}

/// Protobuf-encoded bytes of the session's messages on one node's stream (gRPC framing
/// and TLS records not included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Coordinator → node.
    pub to_node: u64,
    /// Node → coordinator.
    pub from_node: u64,
}

type TrafficLog = Arc<Mutex<BTreeMap<usize, Traffic>>>;

fn count(log: &TrafficLog, index: usize, f: impl FnOnce(&mut Traffic)) {
    // A poisoned lock only loses a statistic; the session goes on.
    if let Ok(mut map) = log.lock() {
        f(map.entry(index).or_default());
    }
}

struct End {
    index: usize,
    id: NodeId,
    tx: mpsc::Sender<proto::SecAggUp>,
    rx: tonic::Streaming<proto::SecAggDown>,
    terms: Option<proto::SecAggTerms>,
    traffic: TrafficLog,
}

impl End {
    async fn send(&self, step: Up) -> bool {
        let msg = proto::SecAggUp { step: Some(step) };
        let len = msg.encoded_len() as u64;
        let sent = self.tx.send(msg).await.is_ok();
        if sent {
            count(&self.traffic, self.index, |t| t.to_node += len);
        }
        sent
    }
}

/// Messages buffered towards each node.
const BUFFER: usize = 4;

fn dropped(
    index: usize,
    outcome: NodeOutcome,
    reason: Option<DenialReason>,
    message: String,
) -> Member {
    Member {
        index,
        outcome,
        reason,
        message,
        population: 0.0,
        epsilon: 0.0,
        delta: 0.0,
    }
}

fn from_call<T>(index: usize, c: CallOutcome<T>, round: &str) -> Member {
    match c {
        CallOutcome::Refused(d) => dropped(
            index,
            NodeOutcome::Refused,
            Some(d.reason),
            format!("{} (in {round})", d.message),
        ),
        CallOutcome::TimedOut(m) => dropped(
            index,
            NodeOutcome::TimedOut,
            None,
            format!("{m} (in {round})"),
        ),
        CallOutcome::Unreachable(m) => dropped(index, NodeOutcome::Unreachable, None, m),
        CallOutcome::Malformed { reason, .. } => dropped(
            index,
            NodeOutcome::Malformed,
            None,
            format!("{reason} (in {round})"),
        ),
        CallOutcome::Answered(_) => dropped(
            index,
            NodeOutcome::Malformed,
            None,
            format!("an unexpected answer (in {round})"),
        ),
    }
}

/// Open a stream to one node and send the signed query.
async fn open(
    client: &NodeClient,
    index: usize,
    query: proto::AggregateQuery,
    deadline: Duration,
    traffic: TrafficLog,
) -> Result<End, Member> {
    let id = NodeId::new(&client.config.id).map_err(|e| {
        dropped(
            index,
            NodeOutcome::Malformed,
            None,
            format!("its id is not a registry node id: {e}"),
        )
    })?;
    let (tx, rx) = mpsc::channel(BUFFER);
    let first = proto::SecAggUp {
        step: Some(Up::Open(proto::SecAggOpen { query: Some(query) })),
    };
    let len = first.encoded_len() as u64;
    if tx.send(first).await.is_err() {
        return Err(dropped(
            index,
            NodeOutcome::Unreachable,
            None,
            "the stream closed before it opened".into(),
        ));
    }
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    req.set_timeout(deadline);
    count(&traffic, index, |t| t.to_node += len);
    match client.client().secure_aggregate(req).await {
        Ok(resp) => Ok(End {
            index,
            id,
            tx,
            rx: resp.into_inner(),
            terms: None,
            traffic,
        }),
        Err(status) => Err(from_call::<()>(
            index,
            classify(&status),
            "opening the session",
        )),
    }
}

/// The node's next message within the round's timeout.
async fn next(end: &mut End, timeout: Duration, round: &str) -> Result<Down, Member> {
    match tokio::time::timeout(timeout, end.rx.message()).await {
        Err(_) => Err(dropped(
            end.index,
            NodeOutcome::TimedOut,
            None,
            format!(
                "silent for {:.1} s in {round}; dropped from the session",
                timeout.as_secs_f64()
            ),
        )),
        Ok(Ok(Some(msg))) => {
            let len = msg.encoded_len() as u64;
            count(&end.traffic, end.index, |t| t.from_node += len);
            msg.step.ok_or_else(|| {
                dropped(
                    end.index,
                    NodeOutcome::Malformed,
                    None,
                    format!("sent a message with no step in {round}"),
                )
            })
        }
        Ok(Ok(None)) => Err(dropped(
            end.index,
            NodeOutcome::Unreachable,
            None,
            format!("closed its stream in {round}"),
        )),
        Ok(Err(status)) => Err(from_call::<()>(end.index, classify(&status), round)),
    }
}

fn bad(end: &End, round: &str, why: impl std::fmt::Display) -> Member {
    dropped(
        end.index,
        NodeOutcome::Malformed,
        None,
        format!("{why} (in {round}); dropped from the session"),
    )
}

/// The cohort's parameters, from its members' terms and the coordinator's own
/// dropout rule: the strictest member decides each.
fn parameters(
    terms: &[proto::SecAggTerms],
    min_survivors: f64,
) -> Result<(SessionParams, accountant::Calibration), String> {
    let n = u32::try_from(terms.len()).map_err(|_| "too many members".to_string())?;
    let need_cohort = terms.iter().map(|t| t.min_cohort).max().unwrap_or(2).max(2);
    if n < need_cohort {
        return Err(format!(
            "only {n} partners can take part, and their policies need a cohort of at least {need_cohort}; nothing was spent"
        ));
    }
    let c = terms
        .iter()
        .map(|t| t.assumed_noiseless_peers)
        .max()
        .unwrap_or(0);
    let frac = terms
        .iter()
        .map(|t| t.min_survivors)
        .fold(min_survivors, f64::max)
        .clamp(0.0, 1.0);
    let t_noise = ((frac * f64::from(n)).ceil() as u32).clamp(c + 1, n);
    let t_sss = ((n + c) / 2 + 1).max(2 * n / 3 + 1).min(t_noise);
    let first = terms.first().ok_or_else(|| "no members".to_string())?;
    let target = NoiseTarget {
        rho: terms.iter().map(|t| t.rho).fold(f64::INFINITY, f64::min),
        delta1: terms.iter().map(|t| t.delta1).fold(0.0, f64::max),
        delta2: terms.iter().map(|t| t.delta2).fold(0.0, f64::max),
        dim: u32::try_from(first.gammas.len()).map_err(|_| "too many coordinates".to_string())?,
    };
    let cal =
        accountant::calibrate(Cohort { n, t_noise, c }, &target).map_err(|e| e.to_string())?;
    let params = SessionParams {
        n,
        t_sss,
        t_noise,
        c,
        lattice: cal.lattice,
        gammas: first.gammas.clone(),
        layout_digest: <[u8; 32]>::try_from(&first.layout_digest[..])
            .map_err(|_| "a layout digest is not 32 bytes".to_string())?,
        sigma_share: cal.sigma_share,
    };
    params
        .check()
        .map_err(|e| format!("no valid session for this cohort: {e}"))?;
    Ok((params, cal))
}

/// Run one session over `clients` (the nodes serving the dataset, by registry index).
pub async fn run_session(
    clients: &[(usize, &NodeClient)],
    query: proto::AggregateQuery,
    body: &QueryBody,
    setup: &SecureSetup,
    deadline: Duration,
) -> SessionOutcome {
    let traffic = TrafficLog::default();
    let (members, total) = rounds(clients, query, body, setup, deadline, &traffic).await;
    let traffic = match traffic.lock() {
        Ok(mut map) => std::mem::take(&mut *map),
        Err(_) => BTreeMap::new(),
    };
    let mut per_node: Vec<u64> = traffic.values().map(|t| t.to_node + t.from_node).collect();
    per_node.sort_unstable();
    if let (Some(max), Some(median)) = (per_node.last(), per_node.get(per_node.len() / 2)) {
        tracing::info!(
            query_id = %body.query_id,
            nodes = per_node.len(),
            max_bytes_per_node = max,
            median_bytes_per_node = median,
            total_bytes = per_node.iter().sum::<u64>(),
            "secure session traffic (protobuf payload, both directions)"
        );
    }
    SessionOutcome {
        members,
        total,
        traffic,
    }
}

type Ended = (Vec<Member>, Result<SecureTotal, String>);

async fn rounds(
    clients: &[(usize, &NodeClient)],
    query: proto::AggregateQuery,
    body: &QueryBody,
    setup: &SecureSetup,
    deadline: Duration,
    traffic: &TrafficLog,
) -> Ended {
    let mut members: BTreeMap<usize, Member> = BTreeMap::new();
    let t = setup.round_timeout;

    // Open every stream and read every node's terms (it has decided, nothing spent).
    let opened = join_all(
        clients
            .iter()
            .map(|(i, c)| open(c, *i, query.clone(), deadline, traffic.clone())),
    )
    .await;
    let mut ends: Vec<End> = Vec::new();
    for o in opened {
        match o {
            Ok(e) => ends.push(e),
            Err(m) => {
                members.insert(m.index, m);
            }
        }
    }
    let terms = join_all(ends.iter_mut().map(|e| async move {
        match next(e, t, "stating its terms").await {
            Ok(Down::Terms(terms)) => Ok(terms),
            Ok(_) => Err(bad(e, "stating its terms", "sent data before its terms")),
            Err(m) => Err(m),
        }
    }))
    .await;
    let mut kept = Vec::new();
    for (mut e, r) in ends.into_iter().zip(terms) {
        match r {
            Ok(terms) => {
                e.terms = Some(terms);
                kept.push(e);
            }
            Err(m) => {
                members.insert(m.index, m);
            }
        }
    }
    // The largest group of members contributing the same vector forms the cohort.
    let mut groups: BTreeMap<Vec<u8>, usize> = BTreeMap::new();
    for e in &kept {
        if let Some(t) = &e.terms {
            *groups.entry(t.layout_digest.clone()).or_default() += 1;
        }
    }
    let chosen = groups
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(d, _)| d.clone())
        .unwrap_or_default();
    let mut cohort: Vec<End> = Vec::new();
    for e in kept {
        if e.terms.as_ref().is_some_and(|t| t.layout_digest == chosen) {
            cohort.push(e);
        } else {
            members.insert(
                e.index,
                dropped(e.index, NodeOutcome::Refused, Some(DenialReason::PolicyDenied),
                    "its policy declares this dataset differently (bounds, domains or bins) from the other partners', so its figures cannot be summed with theirs".into()),
            );
        }
    }
    let fail = |members: BTreeMap<usize, Member>, why: String| -> Ended {
        (members.into_values().collect(), Err(why))
    };
    let term_list: Vec<proto::SecAggTerms> =
        cohort.iter().filter_map(|e| e.terms.clone()).collect();
    let populations: BTreeMap<usize, f64> = cohort
        .iter()
        .filter_map(|e| e.terms.as_ref().map(|t| (e.index, t.population)))
        .collect();
    let (params, cal) = match parameters(&term_list, setup.min_survivors) {
        Ok(p) => p,
        Err(why) => {
            for e in &cohort {
                members.insert(
                    e.index,
                    dropped(
                        e.index,
                        NodeOutcome::Refused,
                        Some(DenialReason::Unavailable),
                        why.clone(),
                    ),
                );
            }
            return fail(members, why);
        }
    };
    let info = Terms::of(&term_list);
    let mut nonce = vec![0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let digest = match phm_relay::parse_digest(&body.digest()) {
        Ok(d) => d,
        Err(e) => return fail(members, format!("the query digest: {e}")),
    };
    let begin = Begin {
        query_id: body.query_id.clone(),
        query_digest: digest,
        session_nonce: nonce,
        cohort: cohort.iter().map(|e| e.id.clone()).collect(),
        params: params.clone(),
        registry: setup.registry.clone(),
    };
    let now_ms = u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0);
    let mut server = match Server::new(&begin, &setup.registry_key, now_ms) {
        Ok(s) => s,
        Err(e) => return fail(members, format!("the session cannot start: {e}")),
    };
    let mut alive: BTreeMap<NodeId, End> = cohort.into_iter().map(|e| (e.id.clone(), e)).collect();

    // R0: the session; each node answers with its signed keys.
    let begin_msg = wire::begin_to_proto(&begin);
    exchange(
        &mut alive,
        &mut members,
        t,
        "R0 (keys)",
        |_| Some(Up::Begin(begin_msg.clone())),
        |id, d| match d {
            Down::Keys(k) => {
                let k = wire::keys_from_proto(&k).map_err(|e| e.to_string())?;
                server.receive_keys(id, k).map_err(|e| e.to_string())
            }
            _ => Err(UNEXPECTED.into()),
        },
    )
    .await;
    let peer_keys = match server.close_keys() {
        Ok(p) => p,
        Err(e) => return abort(alive, members, format!("{e}; nothing was spent")),
    };
    retain(&mut alive, &mut members, &server.u1(), "R0 (keys)");

    // R1: every node's encrypted shares for every other.
    let pk = wire::peer_keys_to_proto(&peer_keys);
    exchange(
        &mut alive,
        &mut members,
        t,
        "R1 (shares)",
        |_| Some(Up::PeerKeys(pk.clone())),
        |id, d| match d {
            Down::Shares(s) => {
                let s = wire::share_keys_from_proto(id, &s).map_err(|e| e.to_string())?;
                server.receive_shares(id, s).map_err(|e| e.to_string())
            }
            _ => Err(UNEXPECTED.into()),
        },
    )
    .await;
    let forwarded = match server.close_shares() {
        Ok(f) => f,
        Err(e) => return abort(alive, members, format!("{e}; nothing was spent")),
    };
    retain(&mut alive, &mut members, &server.u2(), "R1 (shares)");

    // R2: each node commits (spends) and sends its masked input.
    let fwd: BTreeMap<NodeId, proto::SecAggShares> = forwarded
        .iter()
        .map(|(id, f)| (id.clone(), wire::forwarded_to_proto(f)))
        .collect();
    let mut committed: Vec<NodeId> = Vec::new();
    exchange(
        &mut alive,
        &mut members,
        t,
        "R2 (masked input)",
        |id| fwd.get(id).cloned().map(Up::Forwarded),
        |id, d| match d {
            Down::Masked(y) => {
                // A masked input means its sender has spent, accepted or not.
                committed.push(id.clone());
                server
                    .receive_masked(id, wire::masked_from_proto(id, &y))
                    .map_err(|e| e.to_string())
            }
            _ => Err(UNEXPECTED.into()),
        },
    )
    .await;
    let spent_note = "; the nodes that sent a masked input have spent their budget";
    let survivors = match server.close_masked() {
        Ok(s) => s,
        Err(e) => return abort(alive, members, format!("{e}{spent_note}")),
    };
    retain(
        &mut alive,
        &mut members,
        &survivors.survivors,
        "R2 (masked input)",
    );

    // R3: every survivor signs the survivor set.
    let sv = wire::survivors_to_proto(&survivors);
    exchange(
        &mut alive,
        &mut members,
        t,
        "R3 (consistency)",
        |_| Some(Up::Survivors(sv.clone())),
        |id, d| match d {
            Down::Signature(s) => {
                let s = wire::signature_from_proto(&s).map_err(|e| e.to_string())?;
                server.receive_signature(id, s).map_err(|e| e.to_string())
            }
            _ => Err(UNEXPECTED.into()),
        },
    )
    .await;
    let unmask = match server.close_signatures() {
        Ok(u) => u,
        Err(e) => return abort(alive, members, format!("{e}{spent_note}")),
    };

    // R4: the signers reveal the shares that strip the masks.
    let um = wire::unmask_request_to_proto(&unmask);
    exchange(
        &mut alive,
        &mut members,
        t,
        "R4 (unmasking)",
        |_| Some(Up::Unmask(um.clone())),
        |id, d| match d {
            Down::UnmaskShares(u) => {
                let u = wire::unmask_shares_from_proto(id, &u).map_err(|e| e.to_string())?;
                server.receive_unmask(id, u).map_err(|e| e.to_string())
            }
            _ => Err(UNEXPECTED.into()),
        },
    )
    .await;
    let total = match server.finish() {
        Ok(t) => t,
        Err(e) => return abort(alive, members, format!("{e}{spent_note}")),
    };
    drop(alive);

    // Coverage: who is in the total, who dropped (and had or had not spent).
    let by_id: BTreeMap<&str, usize> = clients
        .iter()
        .map(|(i, c)| (c.config.id.as_str(), *i))
        .collect();
    for id in &total.survivors {
        if let Some(&i) = by_id.get(id.as_str()) {
            members.insert(
                i,
                Member {
                    index: i,
                    outcome: NodeOutcome::Answered,
                    reason: None,
                    message: String::new(),
                    population: populations.get(&i).copied().unwrap_or(0.0),
                    epsilon: info.epsilon,
                    delta: info.delta,
                },
            );
        }
    }
    for id in &committed {
        if let Some(&i) = by_id.get(id.as_str())
            && let Some(m) = members.get_mut(&i)
            && m.outcome != NodeOutcome::Answered
        {
            m.message
                .push_str("; it had already spent its budget (its input is not in the total)");
        }
    }
    let rows = match layout_rows(body, &info, &total, &params) {
        Ok(r) => r,
        Err(why) => return fail(members, why),
    };
    let survivors = u32::try_from(total.survivors.len()).unwrap_or(u32::MAX);
    let (eps, delta) = (info.epsilon, info.delta);
    let delta1 = term_list.iter().map(|t| t.delta1).fold(0.0, f64::max);
    let gamma_count = params.gammas.first().copied().unwrap_or(1.0);
    // COUNT's per-person sensitivity in persons: Δ₂ in units × γ of a count unit.
    let count_delta2 = term_list.iter().map(|t| t.delta2).fold(0.0, f64::max) * gamma_count;
    let count_delta1 = delta1 * gamma_count;
    let rho = term_list
        .iter()
        .map(|t| t.rho)
        .fold(f64::INFINITY, f64::min);
    (
        members.into_values().collect(),
        Ok(SecureTotal {
            rows,
            min_reportable_count: info.min_reportable_count,
            rounded: info.rounded,
            survivors,
            cohort: params.n,
            t_noise: params.t_noise,
            count_sd_secure: cal.total_sd(survivors) * gamma_count,
            count_sd_plain_laplace: accountant::plain_laplace_sd(params.n, eps, count_delta1),
            count_sd_plain_gaussian: accountant::plain_gaussian_sd(params.n, rho, count_delta2),
            epsilon: eps,
            delta,
        }),
    )
}

/// What the cohort's terms add up to for the release.
struct Terms {
    min_reportable_count: f64,
    rounded: bool,
    epsilon: f64,
    delta: f64,
    group_columns: Vec<String>,
    keys: Vec<Vec<String>>,
}

impl Terms {
    fn of(terms: &[proto::SecAggTerms]) -> Terms {
        let first = terms.first();
        Terms {
            min_reportable_count: terms
                .iter()
                .map(|t| t.min_reportable_count)
                .fold(0.0, f64::max),
            rounded: terms.iter().any(|t| t.rounding != "none"),
            epsilon: first.map_or(0.0, |t| t.epsilon),
            delta: first.map_or(0.0, |t| t.delta),
            group_columns: first.map(|t| t.group_columns.clone()).unwrap_or_default(),
            keys: first
                .map(|t| t.keys.iter().map(|k| k.labels.clone()).collect())
                .unwrap_or_default(),
        }
    }
}

/// Send each live node its request (or drop it when `request` has none for it), then
/// read each one's reply within the timeout, all at once.
async fn round(
    alive: &mut BTreeMap<NodeId, End>,
    timeout: Duration,
    name: &str,
    request: impl Fn(&NodeId) -> Option<Up>,
) -> Vec<(NodeId, Result<Down, Member>)> {
    let futures = alive.iter_mut().map(|(id, end)| {
        let msg = request(id);
        async move {
            let Some(step) = msg else {
                return (
                    id.clone(),
                    Err(dropped(
                        end.index,
                        NodeOutcome::TimedOut,
                        None,
                        format!("not in the session's set at {name}"),
                    )),
                );
            };
            if !end.send(step).await {
                return (
                    id.clone(),
                    Err(dropped(
                        end.index,
                        NodeOutcome::Unreachable,
                        None,
                        format!("its stream closed before {name}"),
                    )),
                );
            }
            (id.clone(), next(end, timeout, name).await)
        }
    });
    let started = std::time::Instant::now();
    let replies = join_all(futures).await;
    tracing::debug!(
        round = name,
        ms = started.elapsed().as_secs_f64() * 1e3,
        "secure round"
    );
    for (id, r) in &replies {
        if r.is_err() {
            alive.remove(id);
        }
    }
    replies
}

const UNEXPECTED: &str = "an unexpected message";

/// One round: [`round`]'s request and replies, then [`settle`]'s verdict on each.
async fn exchange(
    alive: &mut BTreeMap<NodeId, End>,
    members: &mut BTreeMap<usize, Member>,
    timeout: Duration,
    name: &str,
    request: impl Fn(&NodeId) -> Option<Up>,
    accept: impl FnMut(&NodeId, Down) -> Result<(), String>,
) {
    let replies = round(alive, timeout, name, request).await;
    settle(replies, alive, members, name, accept);
}

/// Hand each reply of a round to `accept`; a node whose reply is missing (it is already
/// in `members`) or refused by `accept` leaves the session.
fn settle(
    replies: Vec<(NodeId, Result<Down, Member>)>,
    alive: &mut BTreeMap<NodeId, End>,
    members: &mut BTreeMap<usize, Member>,
    round: &str,
    mut accept: impl FnMut(&NodeId, Down) -> Result<(), String>,
) {
    for (id, r) in replies {
        match r {
            Ok(d) => {
                if let Err(why) = accept(&id, d) {
                    reject(alive, members, &id, round, why);
                }
            }
            Err(m) => {
                members.insert(m.index, m);
            }
        }
    }
}

fn reject(
    alive: &mut BTreeMap<NodeId, End>,
    members: &mut BTreeMap<usize, Member>,
    id: &NodeId,
    round: &str,
    why: impl std::fmt::Display,
) {
    if let Some(end) = alive.remove(id) {
        let m = bad(&end, round, why);
        members.insert(m.index, m);
    }
}

/// Keep only the nodes the server kept in the set it just fixed.
fn retain(
    alive: &mut BTreeMap<NodeId, End>,
    members: &mut BTreeMap<usize, Member>,
    keep: &[NodeId],
    round: &str,
) {
    let gone: Vec<NodeId> = alive
        .keys()
        .filter(|id| !keep.contains(id))
        .cloned()
        .collect();
    for id in gone {
        if let Some(end) = alive.remove(&id) {
            members.entry(end.index).or_insert_with(|| {
                dropped(
                    end.index,
                    NodeOutcome::TimedOut,
                    None,
                    format!("left out of the set after {round}"),
                )
            });
        }
    }
}

fn abort(alive: BTreeMap<NodeId, End>, mut members: BTreeMap<usize, Member>, why: String) -> Ended {
    for (_, end) in alive {
        members.entry(end.index).or_insert_with(|| {
            dropped(
                end.index,
                NodeOutcome::Refused,
                Some(DenialReason::Unavailable),
                format!("the session was abandoned: {why}"),
            )
        });
    }
    (members.into_values().collect(), Err(why))
}

/// The total as one row per cell, with each figure's noise: the sum of |U3| discrete
/// Gaussian shares of σ_share lattice units, i.e. sd √|U3|·σ_share/g·γ per coordinate.
fn layout_rows(
    body: &QueryBody,
    info: &Terms,
    total: &Total,
    params: &SessionParams,
) -> Result<Vec<NodeRow>, String> {
    let expected = Expected::from_query(body);
    let per_cell: usize = body
        .aggregates
        .iter()
        .map(|a| if a.kind == AggregateKind::Mean { 2 } else { 1 })
        .sum();
    if info.keys.is_empty() || per_cell * info.keys.len() != total.values.len() {
        return Err(format!(
            "the total has {} coordinates, but the query's layout needs {} cells × {per_cell}",
            total.values.len(),
            info.keys.len()
        ));
    }
    if info.group_columns != expected.group_columns {
        return Err("the partners' group columns are not the query's".into());
    }
    let s = f64::from(u32::try_from(total.survivors.len()).unwrap_or(u32::MAX));
    let sd_units = s.sqrt() * params.sigma_share / params.lattice as f64;
    let mut rows = Vec::with_capacity(info.keys.len());
    let mut at = 0usize;
    for key in &info.keys {
        let mut cells = Vec::with_capacity(body.aggregates.len());
        for a in &body.aggregates {
            let coord = |i: usize| -> (f64, f64) {
                let v = total.values.get(i).copied().unwrap_or(0.0);
                let g = params.gammas.get(i).copied().unwrap_or(1.0);
                (v, sd_units * g)
            };
            let cell = if a.kind == AggregateKind::Mean {
                let (s_v, s_sd) = coord(at);
                let (c_v, c_sd) = coord(at + 1);
                at += 2;
                let noise = |sd: f64| {
                    Noise::Known(Dist {
                        shape: Shape::Gaussian,
                        integer: false,
                        scale: sd,
                    })
                };
                let est = if c_v > 0.0 { s_v / c_v } else { 0.0 };
                NodeCell {
                    estimate: est,
                    noisy_value: est,
                    variance: 0.0,
                    ci95_low: est,
                    ci95_high: est,
                    suppressed: false,
                    suppression_reason: String::new(),
                    noise: noise(0.0),
                    mean: Some(MeanNoise {
                        parts: MeanParts {
                            noisy_sum: s_v,
                            sum_variance: s_sd * s_sd,
                            noisy_count: c_v,
                            count_variance: c_sd * c_sd,
                            centre: 0.0,
                        },
                        sum: noise(s_sd),
                        count: noise(c_sd),
                    }),
                }
            } else {
                let (v, sd) = coord(at);
                at += 1;
                NodeCell {
                    estimate: v,
                    noisy_value: v,
                    variance: sd * sd,
                    ci95_low: v - Z95 * sd,
                    ci95_high: v + Z95 * sd,
                    suppressed: false,
                    suppression_reason: String::new(),
                    noise: Noise::Known(Dist {
                        shape: Shape::Gaussian,
                        integer: false,
                        scale: sd,
                    }),
                    mean: None,
                }
            };
            cells.push(cell);
        }
        rows.push(NodeRow {
            key: key.clone(),
            cells,
        });
    }
    Ok(rows)
}

/// The standard normal's 97.5% quantile: the total's noise is a sum of many discrete
/// Gaussians (sub-Gaussian, and within a fraction of a lattice step of the normal at
/// σ ≥ 4 steps).
const Z95: f64 = 1.959_963_984_540_054;

/// A refusal for a secure query the coordinator cannot run at all.
pub fn not_configured() -> Denial {
    Denial::new(
        DenialReason::PolicyDenied,
        "this coordinator has no [secure_aggregation] section (the node registry it relays), so it runs no secure query",
    )
}

/// Read and verify `[secure_aggregation]`'s registry at start-up, so a missing, unsigned
/// or expired registry is an error naming the file, not a refusal per query.
pub fn load_setup(config: &crate::config::Config) -> Result<Option<SecureSetup>, String> {
    let Some(s) = &config.secure else {
        return Ok(None);
    };
    let path = s.registry.display();
    let text = std::fs::read_to_string(&s.registry)
        .map_err(|e| format!("secure_aggregation.registry {path}: {e}"))?;
    let registry =
        Registry::parse(&text).map_err(|e| format!("secure_aggregation.registry {path}: {e}"))?;
    let registry_key = phm_proto::signing::public_key_from_base64(&s.registry_key)
        .map_err(|e| format!("secure_aggregation.registry_key: {e}"))?;
    let now_ms = u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0);
    registry.verify(&registry_key, now_ms).map_err(|e| {
        format!("secure_aggregation.registry {path}: {e} (checked against secure_aggregation.registry_key)")
    })?;
    Ok(Some(SecureSetup {
        registry,
        registry_key,
        min_survivors: f64::from(s.min_survivors_permille) / 1000.0,
        round_timeout: s.round_timeout,
    }))
}

/// The sentence under a secure result: how it was formed, who is in it, and the
/// predicted error of each COUNT beside what plain mode would have given.
pub fn secure_note(t: &SecureTotal, kind: phm_proto::result::TotalKind) -> String {
    let better = if t.count_sd_secure <= t.count_sd_plain_laplace {
        "secure mode is the more accurate here"
    } else {
        "with this few partners plain mode (each partner's own discrete Laplace) would have been more accurate; secure mode's gain is that no partner's own figure exists anywhere"
    };
    format!(
        "Secure aggregation: the system total of {} of {} partners (the noise holds with at least {} surviving); no partner's own figure was released or seen by the coordinator. Predicted standard deviation of each count: {:.1} in secure mode; plain mode would give {:.1} with each partner's discrete Laplace, {:.1} with its discrete Gaussian ({better}). {}",
        t.survivors,
        t.cohort,
        t.t_noise,
        t.count_sd_secure,
        t.count_sd_plain_laplace,
        t.count_sd_plain_gaussian,
        match kind {
            phm_proto::result::TotalKind::DistinctPeople =>
                "Each person is counted at the partner that holds them.",
            _ => "A person known to several partners counts once at each.",
        }
    )
}
