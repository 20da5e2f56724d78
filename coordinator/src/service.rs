//! phm.v1.CoordinatorService: validate a signed query, relay it unchanged to every
//! node serving its dataset concurrently, stream per-node progress, combine, record
//! the answer durably and stream it; plus GetResult, ListNodes and Budget.

use crate::combine::{self, Expected, NodeAnswer, NodeMeta};
use crate::config::{Config, TotalKind};
use crate::fanout::{CallOutcome, NodeClient};
use crate::history::{Claim, History, StoredQuery};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use phm_proto::proto::coordinator_service_server::CoordinatorService;
use phm_proto::{Denial, DenialReason, RequesterProof, SignedQuery, proto};
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

type InFlight = HashMap<String, (String, watch::Receiver<bool>)>;

/// The coordinator service. Cheap to clone.
#[derive(Clone)]
pub struct Coordinator {
    inner: Arc<Inner>,
}

struct Inner {
    clients: Vec<NodeClient>,
    history: History,
    deadline: Duration,
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

fn to_proto_rows(rows: Vec<combine::Row>) -> Vec<proto::CombinedRow> {
    rows.into_iter()
        .map(|r| proto::CombinedRow {
            key: r.key,
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
    query_id: String,
    done: watch::Sender<bool>,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if let Ok(mut map) = self.inner.in_flight.lock() {
            map.remove(&self.query_id);
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
    digest: String,
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
}

impl Inner {
    fn plan(self: &Arc<Self>, query_id: &str, digest: &str) -> Result<Plan, Status> {
        let mut map = self
            .in_flight
            .lock()
            .map_err(|_| internal("in-flight table poisoned"))?;
        if let Some((d, rx)) = map.get(query_id) {
            if d != digest {
                return Err(reused(query_id));
            }
            return Ok(Plan::Wait(rx.clone()));
        }
        let needs_flush = match self.history.claim(query_id, digest).map_err(internal)? {
            Claim::New => true,
            Claim::Existing(rec) if rec.digest != digest => return Err(reused(query_id)),
            Claim::Existing(rec) if rec.result.is_some() => return Ok(Plan::Replay(rec)),
            // Claimed by a run that never finished (the coordinator stopped): run it
            // again; nodes answer a known query id from their release cache.
            Claim::Existing(_) => false,
        };
        let (tx, rx) = watch::channel(false);
        map.insert(query_id.to_string(), (digest.to_string(), rx));
        Ok(Plan::Run(
            InFlightGuard {
                inner: Arc::clone(self),
                query_id: query_id.to_string(),
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
        let mut progress = proto::NodeProgress {
            node: Some(node_ref(&client.config)),
            elapsed_ms: u32::try_from(elapsed.as_millis()).unwrap_or(u32::MAX),
            nodes_total,
            ..Default::default()
        };
        let mut answer = None;
        let mut population = 0.0;
        match outcome {
            CallOutcome::Answered(result) => {
                let epsilon = result.epsilon_spent;
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
        }
    }

    /// Fan out, stream progress, combine, record, stream the result.
    async fn run(self: Arc<Self>, job: Job, tx: EventSender, guard: InFlightGuard) {
        let _guard = guard;
        let Job {
            query,
            body,
            digest,
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
            digest,
            progress: progress_log,
            result: Some(result.clone()),
        };
        // Durable before anyone sees it, so a retry gets exactly this answer.
        if let Err(e) = self.history.finish(&body.query_id, &record).await {
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
        let kind = self
            .total_kinds
            .get(&body.dataset)
            .copied()
            .unwrap_or_default();
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
            total_note: total_note(kind, answers.len(), targets.len()),
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
        }
    }
}

fn reused(query_id: &str) -> Status {
    Denial::new(
        DenialReason::QueryIdReused,
        format!(
            "query id {query_id:?} was already used for a different query; \
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
        let body = signed.body;
        let targets: Vec<usize> = (0..self.inner.clients.len())
            .filter(|&i| self.inner.clients[i].config.serves(&body.dataset))
            .collect();
        if targets.is_empty() {
            return Err(Denial::new(
                DenialReason::InvalidQuery,
                format!("no registered node serves dataset {:?}", body.dataset),
            )
            .to_status());
        }
        let digest = body.digest();
        let plan = self.inner.plan(&body.query_id, &digest)?;
        let (tx, rx) = mpsc::channel(targets.len() + 2);
        match plan {
            Plan::Run(guard, needs_flush) => {
                let inner = Arc::clone(&self.inner);
                let job = Job {
                    query,
                    body,
                    digest,
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
                let id = body.query_id.clone();
                tokio::spawn(async move {
                    // Err means the run's guard is gone: it has finished either way.
                    let _ = done.wait_for(|d| *d).await;
                    match inner.history.get(&id) {
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
        let id = request.into_inner().query_id;
        if id.is_empty() || id.len() > phm_proto::query::MAX_ID_LEN {
            return Err(Denial::new(
                DenialReason::InvalidQuery,
                "query_id is missing or too long",
            )
            .to_status());
        }
        match self.inner.history.get(&id).map_err(internal)? {
            Some(StoredQuery {
                result: Some(r), ..
            }) => Ok(Response::new(r)),
            Some(_) => Err(Denial::new(
                DenialReason::Unavailable,
                format!("query {id:?} has not finished yet"),
            )
            .to_status()),
            None => Err(Status::not_found(format!(
                "no query with id {id:?} has been submitted to this coordinator"
            ))),
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
        RequesterProof::try_from(proof).map_err(|e| Denial::from(e).to_status())?;
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
