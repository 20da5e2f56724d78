//! phm.v1.CoordinatorService: authenticate a signed query against the requester
//! directory, relay it unchanged to every node serving its dataset concurrently,
//! stream per-node progress, combine, record the answer durably (bound to its
//! requester and project) and stream it; plus GetResult (with a fresh requester
//! proof), ListNodes and Budget.

use crate::combine::{self, Expected, NodeAnswer, NodeMeta};
use crate::config::{Config, TotalKind};
use crate::fanout::{CallOutcome, NodeClient};
use crate::history::{Claim, History, QueryKey, StoredQuery};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use phm_proto::proto::coordinator_service_server::CoordinatorService;
use phm_proto::{Denial, DenialReason, ProofOp, RequesterProof, SignedQuery, proto};
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// Runs under way, by "requester\0query id": their content digest and a "finished"
/// signal.
type InFlight = HashMap<String, (String, watch::Receiver<bool>)>;

fn in_flight_key(key: &QueryKey<'_>) -> String {
    String::from_utf8_lossy(&key.key_bytes()).into_owned()
}

fn unauthenticated(message: String) -> Status {
    Denial::new(DenialReason::Unauthenticated, message).to_status()
}

/// The coordinator service. Cheap to clone.
#[derive(Clone)]
pub struct Coordinator {
    inner: Arc<Inner>,
}

struct Inner {
    clients: Vec<NodeClient>,
    history: History,
    deadline: Duration,
    federation_id: String,
    requesters: Vec<crate::config::RequesterConfig>,
    validity: Duration,
    total_kinds: HashMap<String, TotalKind>,
    /// Query ids being answered right now, with their digest and a "finished" signal.
    in_flight: Mutex<InFlight>,
}

impl Coordinator {
    pub fn new(config: &Config, clients: Vec<NodeClient>, history: History) -> Coordinator {
        Coordinator {
            inner: Arc::new(Inner {
                clients,
                history,
                deadline: config.node_deadline,
                federation_id: config.federation_id.clone(),
                requesters: config.requesters.clone(),
                validity: config.query_validity,
                total_kinds: config
                    .datasets
                    .iter()
                    .map(|(k, v)| (k.clone(), v.total_kind))
                    .collect(),
                in_flight: Mutex::new(HashMap::new()),
            }),
        }
    }
}

fn node_ref(n: &crate::config::NodeConfig) -> proto::NodeRef {
    proto::NodeRef {
        node_id: n.id.clone(),
        ods_code: n.ods_code.clone(),
        name: n.name.clone(),
        kind: n.kind.clone(),
        place: n.place.clone(),
        pcn: n.pcn.clone(),
    }
}

fn node_meta(n: &crate::config::NodeConfig) -> NodeMeta {
    NodeMeta {
        id: n.id.clone(),
        ods_code: n.ods_code.clone(),
        name: n.name.clone(),
        kind: n.kind.clone(),
        place: n.place.clone(),
        pcn: n.pcn.clone(),
    }
}

fn internal(e: impl std::fmt::Display) -> Status {
    tracing::error!(error = %e, "internal error");
    Denial::new(DenialReason::Internal, format!("coordinator error: {e}")).to_status()
}

fn refusal_message(d: &Denial) -> String {
    if d.reasons.is_empty() {
        d.message.clone()
    } else {
        format!("{} ({})", d.message, d.reasons.join("; "))
    }
}

fn total_note(kind: TotalKind, answered: usize, total: usize) -> String {
    let mut note = match kind {
        TotalKind::DistinctPeople => "Distinct people: in this dataset each person belongs to \
             exactly one partner, so the total counts each person once."
            .to_string(),
        TotalKind::SumOfPartnerCounts => "Sum of partner counts: a person known to more than \
             one partner (for example admitted at two trusts) counts once for each partner."
            .to_string(),
    };
    if answered < total {
        note.push_str(&format!(
            " Partial: only {answered} of the {total} partners serving this dataset answered; \
             the figures cover those partners only."
        ));
    }
    note
}

/// What a total means, given the coordinator's configuration and what each answering
/// partner's policy declares (`datasets.total_kind`). Any disagreement is said in the
/// note, and the reading falls back to the conservative "sum of partner counts" when
/// any partner says its people may also be counted elsewhere. A partner that declares
/// nothing (an older node) is not counted either way.
fn reconcile_total_kind(
    configured: TotalKind,
    declared: &[(String, proto::TotalKind)],
) -> (TotalKind, Option<String>) {
    let as_config = |k: proto::TotalKind| match k {
        proto::TotalKind::DistinctPeople => Some(TotalKind::DistinctPeople),
        proto::TotalKind::SumOfPartnerCounts => Some(TotalKind::SumOfPartnerCounts),
        proto::TotalKind::Unspecified => None,
    };
    let disagree: Vec<&str> = declared
        .iter()
        .filter(|(_, k)| as_config(*k).is_some_and(|k| k != configured))
        .map(|(id, _)| id.as_str())
        .collect();
    if disagree.is_empty() {
        return (configured, None);
    }
    let name = |k: TotalKind| match k {
        TotalKind::DistinctPeople => "distinct people",
        TotalKind::SumOfPartnerCounts => "a sum of partner counts",
    };
    let kind = if declared
        .iter()
        .any(|(_, k)| *k == proto::TotalKind::SumOfPartnerCounts)
    {
        TotalKind::SumOfPartnerCounts
    } else {
        configured
    };
    let note = format!(
        "Mismatch: this coordinator reads the dataset's total as {}, but the policy of {} \
         says otherwise; the total is read as {}. Ask the partners' IG leads and the \
         coordinator's operator to agree on datasets.total_kind.",
        name(configured),
        disagree.join(", "),
        name(kind)
    );
    (kind, Some(note))
}

fn to_proto_rows(rows: Vec<combine::Row>) -> Vec<proto::CombinedRow> {
    rows.into_iter()
        .map(|r| proto::CombinedRow {
            key: r.key,
            missing: r.missing,
            note: r.note,
            cells: r
                .cells
                .into_iter()
                .map(|c| proto::CombinedCell {
                    alias: c.alias,
                    estimate: c.estimate,
                    standard_error: c.standard_error,
                    ci95_low: c.ci95_low,
                    ci95_high: c.ci95_high,
                    suppressed: c.suppressed,
                    suppression_reason: c.suppression_reason,
                    contributors: c.contributors,
                    note: c.note,
                })
                .collect(),
        })
        .collect()
}

type EventSender = mpsc::Sender<Result<proto::SubmitEvent, Status>>;

fn progress_event(p: proto::NodeProgress) -> proto::SubmitEvent {
    proto::SubmitEvent {
        event: Some(proto::submit_event::Event::Progress(p)),
    }
}

fn result_event(r: proto::CombinedResult) -> proto::SubmitEvent {
    proto::SubmitEvent {
        event: Some(proto::submit_event::Event::Result(r)),
    }
}

/// Replay a finished record: its progress events, then its result.
async fn replay(tx: &EventSender, record: StoredQuery) {
    for p in record.progress {
        if tx.send(Ok(progress_event(p))).await.is_err() {
            return;
        }
    }
    if let Some(r) = record.result {
        let _ = tx.send(Ok(result_event(r))).await;
    }
}

/// Removes the in-flight entry and wakes waiters however the run ends.
struct InFlightGuard {
    inner: Arc<Inner>,
    key: String,
    done: watch::Sender<bool>,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if let Ok(mut map) = self.inner.in_flight.lock() {
            map.remove(&self.key);
        }
        let _ = self.done.send(true);
    }
}

enum Plan {
    Run(InFlightGuard, bool),
    Replay(Box<StoredQuery>),
    Wait(watch::Receiver<bool>),
}

/// One query to fan out: the original message (relayed as received), its validated
/// body, its digest and the registry indices of the nodes serving its dataset.
struct Job {
    query: proto::AggregateQuery,
    body: phm_proto::QueryBody,
    /// What the history holds for this query before it finishes.
    claim: StoredQuery,
    targets: Vec<usize>,
    /// Whether the id claim still has to be made durable before nodes are asked.
    needs_flush: bool,
}

/// What one node's call came to, ready for progress and coverage.
struct NodeResult {
    index: usize,
    progress: proto::NodeProgress,
    answer: Option<NodeAnswer>,
    population: f64,
    /// Delta the node reports spending (0 unless it answered).
    delta: f64,
    /// How the node's policy says a total of the dataset reads (unspecified unless
    /// it answered, or for a node that does not say).
    total_kind: proto::TotalKind,
}

impl Inner {
    /// Who is asking: the federation is this one, the requester is in the directory
    /// and not revoked, the signature verifies, the message is fresh and its nonce
    /// new. Every Submit and GetResult passes here, so a stored result is only ever
    /// handed to a fresh, signed request of the requester that asked for it.
    fn authenticate(
        &self,
        op: &str,
        federation_id: &str,
        requester_id: &str,
        issued_at_unix_ms: i64,
        nonce: &[u8],
        verify: impl FnOnce(
            &phm_proto::signing::PublicKey,
        ) -> Result<(), phm_proto::signing::SignatureError>,
    ) -> Result<(), Status> {
        self.check_federation(federation_id)?;
        let Some(requester) = self.requesters.iter().find(|r| r.id == requester_id) else {
            return Err(unauthenticated(format!(
                "requester {requester_id:?} is not in this coordinator's requester directory ([[requesters]] in coordinator.toml)"
            )));
        };
        if requester.revoked {
            return Err(unauthenticated(format!(
                "requester {requester_id:?} is revoked at this coordinator"
            )));
        }
        verify(&requester.public_key).map_err(|e| {
            unauthenticated(format!(
                "signature check failed for requester {requester_id:?}: {e}"
            ))
        })?;
        let now = chrono::Utc::now().timestamp_millis();
        let window = i64::try_from(self.validity.as_millis()).unwrap_or(i64::MAX);
        if now.saturating_sub(issued_at_unix_ms).saturating_abs() > window {
            return Err(Denial::new(
                DenialReason::Stale,
                format!(
                    "the request was issued {:.1} s from this coordinator's clock; it accepts requests issued within ±{} s (sign a fresh one, and check the requester's clock)",
                    now.saturating_sub(issued_at_unix_ms) as f64 / 1000.0,
                    self.validity.as_secs()
                ),
            )
            .to_status());
        }
        let forget = now.saturating_sub(window.saturating_mul(2));
        let fresh = self
            .history
            .record_nonce(op, requester_id, nonce, issued_at_unix_ms, forget)
            .map_err(internal)?;
        if !fresh {
            return Err(Denial::new(
                DenialReason::Replayed,
                "this request's nonce was already used by this requester: a replayed copy of an earlier message is refused (sign a fresh one)",
            )
            .to_status());
        }
        Ok(())
    }

    /// A signature is valid in one federation only: its audience.
    fn check_federation(&self, federation_id: &str) -> Result<(), Status> {
        if federation_id == self.federation_id {
            return Ok(());
        }
        Err(unauthenticated(format!(
            "this request was signed for federation {federation_id:?}, but this coordinator serves federation {:?}",
            self.federation_id
        )))
    }

    fn plan(self: &Arc<Self>, key: &QueryKey<'_>, claim: &StoredQuery) -> Result<Plan, Status> {
        let mut map = self
            .in_flight
            .lock()
            .map_err(|_| internal("in-flight table poisoned"))?;
        let flight = in_flight_key(key);
        if let Some((content, rx)) = map.get(&flight) {
            if *content != claim.content_digest {
                return Err(reused(key.query_id));
            }
            return Ok(Plan::Wait(rx.clone()));
        }
        let needs_flush = match self.history.claim(key, claim.clone()).map_err(internal)? {
            Claim::New => true,
            Claim::Existing(rec) if rec.content_digest != claim.content_digest => {
                return Err(reused(key.query_id));
            }
            Claim::Existing(rec) if rec.result.is_some() => return Ok(Plan::Replay(rec)),
            // Claimed by a run that never finished (the coordinator stopped): run it
            // again; nodes answer a known question from their release cache.
            Claim::Existing(_) => false,
        };
        let (tx, rx) = watch::channel(false);
        map.insert(flight.clone(), (claim.content_digest.clone(), rx));
        Ok(Plan::Run(
            InFlightGuard {
                inner: Arc::clone(self),
                key: flight,
                done: tx,
            },
            needs_flush,
        ))
    }

    async fn ask_node(
        &self,
        index: usize,
        query: proto::AggregateQuery,
        expected: &Expected,
        nodes_total: u32,
    ) -> NodeResult {
        let client = &self.clients[index];
        let (outcome, elapsed) = client.query(query, self.deadline).await;
        // Response times stay in the coordinator's log: sent to analysts they would
        // amplify a timing side channel (a node's time grows with matched rows and
        // thresholded keys), cheaply, by averaging many near-free queries.
        tracing::debug!(node = %client.config.id, elapsed_ms = elapsed.as_millis(), "node call finished");
        let mut progress = proto::NodeProgress {
            node: Some(node_ref(&client.config)),
            nodes_total,
            ..Default::default()
        };
        let mut answer = None;
        let mut population = 0.0;
        let mut delta = 0.0;
        let mut total_kind = proto::TotalKind::Unspecified;
        match outcome {
            CallOutcome::Answered(result) => {
                total_kind = proto::TotalKind::try_from(result.total_kind)
                    .unwrap_or(proto::TotalKind::Unspecified);
                let epsilon = result.epsilon_spent;
                if result.delta_spent.is_finite() && result.delta_spent > 0.0 {
                    delta = result.delta_spent;
                }
                population = result.population_noisy;
                match combine::validate(expected, node_meta(&client.config), result) {
                    Ok(a) => {
                        progress.outcome = proto::NodeOutcome::Answered as i32;
                        progress.epsilon_spent = a.epsilon_spent;
                        progress.message = "answered".into();
                        answer = Some(a);
                    }
                    Err(m) => {
                        progress.outcome = proto::NodeOutcome::Malformed as i32;
                        progress.epsilon_spent = if epsilon.is_finite() { epsilon } else { 0.0 };
                        progress.message = format!("excluded: malformed answer: {m}");
                        population = 0.0;
                    }
                }
            }
            CallOutcome::Refused(d) => {
                progress.outcome = proto::NodeOutcome::Refused as i32;
                progress.reason = d.reason as i32;
                progress.message = refusal_message(&d);
            }
            CallOutcome::Unreachable(m) => {
                progress.outcome = proto::NodeOutcome::Unreachable as i32;
                progress.message = m;
            }
            CallOutcome::TimedOut(m) => {
                progress.outcome = proto::NodeOutcome::TimedOut as i32;
                progress.message = m;
            }
        }
        NodeResult {
            index,
            progress,
            answer,
            population,
            delta,
            total_kind,
        }
    }

    /// Fan out, stream progress, combine, record, stream the result.
    async fn run(self: Arc<Self>, job: Job, tx: EventSender, guard: InFlightGuard) {
        let _guard = guard;
        let Job {
            query,
            body,
            claim,
            targets,
            needs_flush,
        } = job;
        if needs_flush && let Err(e) = self.history.flush().await {
            let _ = tx.send(Err(internal(e))).await;
            return;
        }
        let expected = Expected::from_query(&body);
        let nodes_total = u32::try_from(targets.len()).unwrap_or(u32::MAX);
        tracing::info!(
            query_id = %body.query_id, requester = %body.requester_id,
            dataset = %body.dataset, nodes = targets.len(), "fanning out query"
        );
        let mut pending: FuturesUnordered<_> = targets
            .iter()
            .map(|&i| self.ask_node(i, query.clone(), &expected, nodes_total))
            .collect();
        let mut results: Vec<NodeResult> = Vec::with_capacity(targets.len());
        let mut progress_log = Vec::with_capacity(targets.len());
        while let Some(r) = pending.next().await {
            // A client that went away does not stop the run: the answer is recorded.
            let _ = tx.send(Ok(progress_event(r.progress.clone()))).await;
            progress_log.push(r.progress.clone());
            results.push(r);
        }
        drop(pending);
        results.sort_by_key(|r| r.index);

        let result = self.combined_result(&body, &targets, results);
        tracing::info!(
            query_id = %body.query_id,
            answered = result.coverage.as_ref().map_or(0, |c| c.answered.len()),
            partial = result.coverage.as_ref().is_some_and(|c| c.partial),
            "query combined"
        );
        let record = StoredQuery {
            progress: progress_log,
            result: Some(result.clone()),
            ..claim
        };
        let key = QueryKey {
            requester_id: &body.requester_id,
            query_id: &body.query_id,
        };
        // Durable before anyone sees it, so a retry gets exactly this answer.
        if let Err(e) = self.history.finish(&key, &record).await {
            let _ = tx.send(Err(internal(e))).await;
            return;
        }
        let _ = tx.send(Ok(result_event(result))).await;
    }

    fn combined_result(
        &self,
        body: &phm_proto::QueryBody,
        targets: &[usize],
        results: Vec<NodeResult>,
    ) -> proto::CombinedResult {
        let mut coverage = proto::Coverage::default();
        let mut answers = Vec::new();
        let known = self.history.populations().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read remembered node populations");
            HashMap::new()
        });
        let mut registered = Some(0.0);
        let mut answered_population = Some(0.0);
        let mut delta_per_node: f64 = 0.0;
        let mut declared: Vec<(String, proto::TotalKind)> = Vec::new();
        for r in results {
            let client = &self.clients[r.index];
            let node = node_ref(&client.config);
            let pop = if r.population > 0.0 {
                if let Err(e) = self
                    .history
                    .remember_population(&client.config.id, r.population)
                {
                    tracing::warn!(error = %e, "cannot remember node population");
                }
                Some(r.population)
            } else {
                known.get(&client.config.id).copied().filter(|p| *p > 0.0)
            };
            registered = registered.zip(pop).map(|(a, b)| a + b);
            let refusal = |p: &proto::NodeProgress| proto::NodeRefusal {
                node: Some(node.clone()),
                reason: p.reason,
                message: p.message.clone(),
            };
            match proto::NodeOutcome::try_from(r.progress.outcome) {
                Ok(proto::NodeOutcome::Answered) => {
                    answered_population = answered_population
                        .zip((r.population > 0.0).then_some(r.population))
                        .map(|(a, b)| a + b);
                    coverage.answered.push(node.clone());
                }
                Ok(proto::NodeOutcome::Refused) => coverage.refused.push(refusal(&r.progress)),
                Ok(proto::NodeOutcome::TimedOut) => coverage.timed_out.push(node.clone()),
                Ok(proto::NodeOutcome::Malformed) => coverage.malformed.push(refusal(&r.progress)),
                _ => coverage.unreachable.push(node.clone()),
            }
            if let Some(a) = r.answer {
                delta_per_node = delta_per_node.max(r.delta);
                declared.push((client.config.id.clone(), r.total_kind));
                answers.push(a);
            }
        }
        coverage.partial = answers.len() < targets.len();
        // 0 means unknown: a sum missing some partners would understate the population.
        coverage.population_registered = registered.unwrap_or(0.0);
        coverage.population_answered = if answers.is_empty() {
            0.0
        } else {
            answered_population.unwrap_or(0.0)
        };

        let expected = Expected::from_query(body);
        let combined = combine::combine(&expected, &answers);
        let configured = self
            .total_kinds
            .get(&body.dataset)
            .copied()
            .unwrap_or_default();
        let (kind, kind_note) = reconcile_total_kind(configured, &declared);
        proto::CombinedResult {
            query_id: body.query_id.clone(),
            dataset: body.dataset.clone(),
            group_columns: expected.group_columns.clone(),
            aggregate_aliases: expected.aliases.clone(),
            rows: to_proto_rows(combined.rows),
            coverage: Some(coverage),
            total_kind: match kind {
                TotalKind::DistinctPeople => proto::TotalKind::DistinctPeople,
                TotalKind::SumOfPartnerCounts => proto::TotalKind::SumOfPartnerCounts,
            } as i32,
            total_note: {
                let mut note = total_note(kind, answers.len(), targets.len());
                if let Some(n) = kind_note {
                    note.push(' ');
                    note.push_str(&n);
                }
                for n in &combined.notes {
                    note.push(' ');
                    note.push_str(n);
                }
                note
            },
            epsilon_spent_per_node: combined.epsilon_spent_per_node,
            breakdowns: combined
                .breakdowns
                .into_iter()
                .map(|b| proto::Breakdown {
                    level: b.level.as_str().to_string(),
                    label: b.label,
                    rows: to_proto_rows(b.rows),
                })
                .collect(),
            completed_at_unix_ms: chrono::Utc::now().timestamp_millis(),
            min_reportable_count: combined.min_reportable_count,
            delta_spent_per_node: delta_per_node,
        }
    }
}

fn reused(query_id: &str) -> Status {
    Denial::new(
        DenialReason::QueryIdReused,
        format!(
            "you already used query id {query_id:?} for a different query; \
             give the new query a fresh id"
        ),
    )
    .to_status()
}

type SubmitStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<proto::SubmitEvent, Status>> + Send>>;

#[tonic::async_trait]
impl CoordinatorService for Coordinator {
    type SubmitStream = SubmitStream;

    async fn submit(
        &self,
        request: Request<proto::SubmitRequest>,
    ) -> Result<Response<Self::SubmitStream>, Status> {
        let Some(query) = request.into_inner().query else {
            return Err(
                Denial::new(DenialReason::InvalidQuery, "the request carries no query").to_status(),
            );
        };
        // Validate a copy; the original message is what gets relayed.
        let signed =
            SignedQuery::try_from(query.clone()).map_err(|e| Denial::from(e).to_status())?;
        if signed.signature.is_empty() {
            return Err(Denial::new(
                DenialReason::Unauthenticated,
                "the query is not signed; sign it with the requester's key",
            )
            .to_status());
        }
        // Which datasets exist is public (ListNodes), so this may come first.
        let targets: Vec<usize> = (0..self.inner.clients.len())
            .filter(|&i| self.inner.clients[i].config.serves(&signed.body.dataset))
            .collect();
        if targets.is_empty() {
            return Err(Denial::new(
                DenialReason::InvalidQuery,
                format!(
                    "no registered node serves dataset {:?}",
                    signed.body.dataset
                ),
            )
            .to_status());
        }
        self.inner.authenticate(
            "submit",
            &signed.body.federation_id,
            &signed.body.requester_id,
            signed.body.issued_at_unix_ms,
            &signed.body.nonce,
            |k| signed.verify(k),
        )?;
        let body = signed.body;
        let claim = StoredQuery {
            digest: body.digest(),
            requester_id: body.requester_id.clone(),
            project_id: body.project_id.clone().unwrap_or_default(),
            content_digest: body.content_digest(),
            ..Default::default()
        };
        let key = QueryKey {
            requester_id: &body.requester_id,
            query_id: &body.query_id,
        };
        let plan = self.inner.plan(&key, &claim)?;
        let (tx, rx) = mpsc::channel(targets.len() + 2);
        match plan {
            Plan::Run(guard, needs_flush) => {
                let inner = Arc::clone(&self.inner);
                let job = Job {
                    query,
                    body,
                    claim,
                    targets,
                    needs_flush,
                };
                tokio::spawn(inner.run(job, tx, guard));
            }
            Plan::Replay(record) => {
                tokio::spawn(async move { replay(&tx, *record).await });
            }
            Plan::Wait(mut done) => {
                let inner = Arc::clone(&self.inner);
                let (requester, id) = (body.requester_id.clone(), body.query_id.clone());
                tokio::spawn(async move {
                    // Err means the run's guard is gone: it has finished either way.
                    let _ = done.wait_for(|d| *d).await;
                    let key = QueryKey {
                        requester_id: &requester,
                        query_id: &id,
                    };
                    match inner.history.get(&key) {
                        Ok(Some(rec)) if rec.result.is_some() => replay(&tx, rec).await,
                        Ok(_) => {
                            let _ = tx
                                .send(Err(Denial::new(
                                    DenialReason::Unavailable,
                                    "the earlier run of this query did not finish; submit it again",
                                )
                                .to_status()))
                                .await;
                        }
                        Err(e) => {
                            let _ = tx.send(Err(internal(e))).await;
                        }
                    }
                });
            }
        }
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_result(
        &self,
        request: Request<proto::GetResultRequest>,
    ) -> Result<Response<proto::CombinedResult>, Status> {
        let request = request.into_inner();
        let id = request.query_id;
        if id.is_empty() || id.len() > phm_proto::query::MAX_ID_LEN {
            return Err(Denial::new(
                DenialReason::InvalidQuery,
                "query_id is missing or too long",
            )
            .to_status());
        }
        let Some(raw) = request.proof else {
            return Err(Denial::new(
                DenialReason::Unauthenticated,
                "GetResult needs a fresh proof signed by the requester who submitted the query (op get_result, subject = the query id)",
            )
            .to_status());
        };
        let proof = RequesterProof::try_from(raw).map_err(|e| Denial::from(e).to_status())?;
        if proof.subject.as_deref() != Some(id.as_str()) {
            return Err(unauthenticated(format!(
                "the proof is for {:?}, not for query {id:?}",
                proof.subject.as_deref().unwrap_or("")
            )));
        }
        self.inner.authenticate(
            ProofOp::GetResult.as_str(),
            &proof.federation_id,
            &proof.requester_id,
            proof.issued_at_unix_ms,
            &proof.nonce,
            |k| proof.verify(ProofOp::GetResult, k),
        )?;
        let key = QueryKey {
            requester_id: &proof.requester_id,
            query_id: &id,
        };
        // Looked up under the proving requester only: another requester's ids are
        // not even visible, so "not found" says nothing about them.
        let not_found = || {
            Denial::new(
                DenialReason::NotFound,
                format!(
                    "requester {:?} has submitted no query with id {id:?} to this coordinator",
                    proof.requester_id
                ),
            )
            .to_status()
        };
        let record = self.inner.history.get(&key).map_err(internal)?;
        let Some(record) = record else {
            return Err(not_found());
        };
        if record.requester_id != proof.requester_id {
            return Err(not_found());
        }
        let project = proof.project_id.clone().unwrap_or_default();
        if record.project_id != project {
            return Err(Denial::new(
                DenialReason::PolicyDenied,
                format!(
                    "query {id:?} was asked under project {:?}; sign the proof for that project to read it",
                    record.project_id
                ),
            )
            .to_status());
        }
        match record.result {
            Some(r) => Ok(Response::new(r)),
            None => Err(Denial::new(
                DenialReason::Unavailable,
                format!("query {id:?} has not finished yet"),
            )
            .to_status()),
        }
    }

    async fn list_nodes(
        &self,
        _request: Request<proto::ListNodesRequest>,
    ) -> Result<Response<proto::ListNodesResponse>, Status> {
        Ok(Response::new(proto::ListNodesResponse {
            nodes: self
                .inner
                .clients
                .iter()
                .map(|c| proto::NodeInfo {
                    node: Some(node_ref(&c.config)),
                    endpoint: c.config.endpoint.clone(),
                    datasets: c.config.datasets.clone(),
                })
                .collect(),
        }))
    }

    async fn budget(
        &self,
        request: Request<proto::BudgetRequest>,
    ) -> Result<Response<proto::FederatedBudget>, Status> {
        let request = request.into_inner();
        let Some(proof) = request.proof.clone() else {
            return Err(Denial::new(
                DenialReason::InvalidQuery,
                "the budget request carries no requester proof",
            )
            .to_status());
        };
        let proof = RequesterProof::try_from(proof).map_err(|e| Denial::from(e).to_status())?;
        self.inner.check_federation(&proof.federation_id)?;
        let deadline = self.inner.deadline;
        let calls = self.inner.clients.iter().map(|c| {
            let request = request.clone();
            async move {
                let mut nb = proto::NodeBudget {
                    node: Some(node_ref(&c.config)),
                    ..Default::default()
                };
                match c.budget(request, deadline).await {
                    CallOutcome::Answered(b) => {
                        nb.outcome = proto::NodeOutcome::Answered as i32;
                        nb.budget = Some(b);
                    }
                    CallOutcome::Refused(d) => {
                        nb.outcome = proto::NodeOutcome::Refused as i32;
                        nb.message = format!("{}: {}", d.reason_name(), refusal_message(&d));
                    }
                    CallOutcome::Unreachable(m) => {
                        nb.outcome = proto::NodeOutcome::Unreachable as i32;
                        nb.message = m;
                    }
                    CallOutcome::TimedOut(m) => {
                        nb.outcome = proto::NodeOutcome::TimedOut as i32;
                        nb.message = m;
                    }
                }
                nb
            }
        });
        let nodes = futures::future::join_all(calls).await;
        Ok(Response::new(proto::FederatedBudget { nodes }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partner_declaring_another_total_kind_is_flagged_and_the_reading_is_conservative() {
        let dp = proto::TotalKind::DistinctPeople;
        let sum = proto::TotalKind::SumOfPartnerCounts;
        let agree = [("A".to_string(), dp), ("B".to_string(), dp)];
        assert_eq!(
            reconcile_total_kind(TotalKind::DistinctPeople, &agree),
            (TotalKind::DistinctPeople, None)
        );
        let one_says_sum = [("A".to_string(), dp), ("RW2".to_string(), sum)];
        let (kind, note) = reconcile_total_kind(TotalKind::DistinctPeople, &one_says_sum);
        assert_eq!(kind, TotalKind::SumOfPartnerCounts);
        let note = note.unwrap();
        assert!(note.contains("RW2") && note.contains("Mismatch"), "{note}");
        // The coordinator is the conservative one: flagged, reading kept.
        let (kind, note) = reconcile_total_kind(TotalKind::SumOfPartnerCounts, &agree);
        assert_eq!(kind, TotalKind::SumOfPartnerCounts);
        assert!(note.unwrap().contains("A, B"));
        // An older node that declares nothing does not count either way.
        let silent = [("A".to_string(), proto::TotalKind::Unspecified)];
        assert_eq!(
            reconcile_total_kind(TotalKind::DistinctPeople, &silent),
            (TotalKind::DistinctPeople, None)
        );
    }
}
