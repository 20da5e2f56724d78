//! Prometheus metrics of the node (queries by outcome, epsilon spent, policy reloads)
//! and the small plain-HTTP server that exposes them on GET /metrics.
//!
//! /metrics is unauthenticated, so it exports nothing per query beyond outcome counts.
//! In particular there is no latency histogram: query time depends on the data (one
//! noise sample per observed thresholded key, more rows to bound when a filter matches
//! more), and with queries at epsilon 1e-6 costing almost nothing, averaging many
//! timings read off a histogram would turn that side channel into a measurement.
//! Operators who need latency should take it from logs or tracing on the host.
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use tokio::net::TcpListener;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// "answered", "cached", or a refusal reason in lower case (e.g. "policy_denied").
    pub outcome: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// "applied" or "refused".
    pub result: String,
}

/// Every metric the node exports.
pub struct Metrics {
    registry: Registry,
    queries: Family<OutcomeLabel, Counter>,
    epsilon_spent: Counter<f64, AtomicU64>,
    reloads: Family<ResultLabel, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("phm_node");
        let queries = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "queries",
            "Query RPCs by outcome (answered, cached, or the refusal reason)",
            queries.clone(),
        );
        let epsilon_spent = Counter::<f64, AtomicU64>::default();
        registry.register(
            "epsilon_spent",
            "Epsilon debited from budget ledgers (per query, not per ledger)",
            epsilon_spent.clone(),
        );
        let reloads = Family::<ResultLabel, Counter>::default();
        registry.register(
            "policy_reloads",
            "Policy reload attempts by result",
            reloads.clone(),
        );
        Metrics {
            registry,
            queries,
            epsilon_spent,
            reloads,
        }
    }

    /// Count one Query RPC by outcome. The elapsed time is accepted so callers need not
    /// change, and deliberately not exported (see the module docs).
    pub fn query_outcome(&self, outcome: &str, _elapsed_seconds: f64) {
        self.queries
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    pub fn spent(&self, epsilon: f64) {
        if epsilon.is_finite() && epsilon > 0.0 {
            self.epsilon_spent.inc_by(epsilon);
        }
    }

    pub fn reload(&self, applied: bool) {
        let result = if applied { "applied" } else { "refused" };
        self.reloads
            .get_or_create(&ResultLabel {
                result: result.to_string(),
            })
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail; an encoder error would only mean a
        // malformed metric name, which `new` rules out.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}

fn respond(metrics: &Metrics, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let (status, ctype, body) = if req.method() == Method::GET && req.uri().path() == "/metrics" {
        (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.render(),
        )
    } else {
        (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "only GET /metrics is served here\n".to_string(),
        )
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(ctype) {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

/// Serve GET /metrics on `listener` until `shutdown` completes.
pub async fn serve_metrics(
    metrics: Arc<Metrics>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener: accept failed");
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let resp = respond(&metrics, &req);
                async move { Ok::<_, std::convert::Infallible>(resp) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!(error = %e, "metrics connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn metrics_are_served_over_http() {
        let m = Arc::new(Metrics::new());
        m.query_outcome("answered", 0.02);
        m.query_outcome("policy_denied", 0.001);
        m.spent(0.25);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_metrics(m.clone(), listener, async {
            let _ = rx.await;
        }));
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).await.unwrap();
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(
            text.contains("phm_node_queries_total{outcome=\"answered\"} 1"),
            "{text}"
        );
        assert!(text.contains("phm_node_epsilon_spent_total 0.25"), "{text}");
        // No timing of any kind leaves the node on this unauthenticated port.
        assert!(!text.contains("latency"), "{text}");
        assert!(!text.contains("seconds"), "{text}");
        assert!(!text.contains("_bucket"), "{text}");
        let _ = tx.send(());
        server.await.unwrap();
    }
}
