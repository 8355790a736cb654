//! The `lab.v1.Backend` service: validation, MySQL reads and writes (items
//! through the [`ItemCache`] when it is on), and the per-method metrics. Every reply, success or error, names this instance
//! (`served_by` in the body, `x-served-by` in the metadata). The work of
//! each request runs under the deadline policy of [`crate::deadline`].

use std::{future::Future, sync::Arc, time::Duration};

use lab_proto::v1::{
    GetItemReply, GetItemRequest, GetJobReply, GetJobRequest, Item, Job, SubmitJobReply,
    SubmitJobRequest, backend_server::Backend,
};
use tokio::time::Instant;
use tonic::{
    Request, Response, Status,
    metadata::{Ascii, MetadataValue},
};

use crate::{
    db::{Db, DbError, ItemRow},
    deadline::{Arrived, DeadlinePolicy, caller_deadline},
    item_cache::ItemCache,
    metrics::{MethodMetrics, Metrics},
};

/// Request handling state shared by every connection.
pub struct BackendService {
    inner: Arc<Inner>,
    policy: DeadlinePolicy,
    metrics: Metrics,
    /// Each method's series, resolved once.
    get_item: MethodMetrics,
    submit_job: MethodMetrics,
    get_job: MethodMetrics,
    /// `x-served-by`, made once: every reply and error carries it.
    served_by: Option<MetadataValue<Ascii>>,
}

/// What the (possibly detached) request work needs.
struct Inner {
    db: Db,
    items: ItemCache,
    instance_id: Arc<str>,
    max_payload_bytes: usize,
    handler_latency: Duration,
}

impl BackendService {
    pub fn new(
        db: Db,
        items: ItemCache,
        instance_id: Arc<str>,
        max_payload_bytes: usize,
        handler_latency: Duration,
        policy: DeadlinePolicy,
        metrics: Metrics,
    ) -> Self {
        Self {
            served_by: MetadataValue::try_from(&*instance_id).ok(),
            inner: Arc::new(Inner {
                db,
                items,
                instance_id,
                max_payload_bytes,
                handler_latency,
            }),
            policy,
            get_item: metrics.method("GetItem"),
            submit_job: metrics.method("SubmitJob"),
            get_job: metrics.method("GetJob"),
            metrics,
        }
    }
}

impl From<DbError> for Status {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Unavailable(reason) => Status::unavailable(reason.to_string()),
            DbError::Deadline(reason) => Status::deadline_exceeded(reason.to_string()),
            DbError::Failed(reason) => Status::internal(reason.to_string()),
        }
    }
}

/// When the request arrived and until when its caller waits.
fn timing<T>(request: &Request<T>) -> (Instant, Option<Instant>) {
    let arrived = request
        .extensions()
        .get::<Arrived>()
        .map_or_else(Instant::now, |a| a.0);
    (arrived, caller_deadline(arrived, request.metadata()))
}

impl BackendService {
    /// Runs one request's `work` under the deadline policy, counts and times
    /// it, and stamps `x-served-by` on the reply or the error.
    async fn serve<T, F, Fut>(
        &self,
        method: &MethodMetrics,
        (arrived, deadline): (Instant, Option<Instant>),
        work: F,
    ) -> Result<Response<T>, Status>
    where
        F: FnOnce(Arc<Inner>, Option<Instant>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, Status>> + Send + 'static,
        T: Send + 'static,
    {
        // Counted by guards: when the caller's deadline passes, tonic drops
        // this future mid-way, and that request must be counted too.
        let _in_flight = self.metrics.in_flight();
        let mut record = Record {
            method,
            arrived,
            code: None,
        };
        let inner = self.inner.clone();
        let result = self
            .policy
            .run(arrived, deadline, move |deadline| async move {
                if !inner.handler_latency.is_zero() {
                    tokio::time::sleep(inner.handler_latency).await;
                }
                work(inner, deadline).await
            })
            .await;
        record.code = Some(match &result {
            Ok(_) => tonic::Code::Ok,
            Err(status) => status.code(),
        });
        drop(record);
        let served_by = self.served_by.clone();
        match result {
            Ok(reply) => {
                let mut response = Response::new(reply);
                if let Some(v) = served_by {
                    response
                        .metadata_mut()
                        .insert(lab_proto::SERVED_BY_METADATA, v);
                }
                Ok(response)
            }
            Err(mut status) => {
                if let Some(v) = served_by {
                    status
                        .metadata_mut()
                        .insert(lab_proto::SERVED_BY_METADATA, v);
                }
                Err(status)
            }
        }
    }
}

/// Counts and times one request when dropped: with the outcome's code, or
/// `Canceled` if the handler was dropped before finishing (tonic does that
/// at the caller's deadline).
struct Record<'a> {
    method: &'a MethodMetrics,
    arrived: Instant,
    code: Option<tonic::Code>,
}

impl Drop for Record<'_> {
    fn drop(&mut self) {
        let code = self.code.unwrap_or(tonic::Code::Cancelled);
        self.method
            .record(code, self.arrived.elapsed().as_secs_f64());
    }
}

fn item_of(row: ItemRow) -> Item {
    Item {
        id: row.id,
        name: row.name,
        price_cents: row.price_cents,
        description: row.description,
    }
}

fn positive_id(field: &str, id: i64) -> Result<i64, Status> {
    if id >= 1 {
        Ok(id)
    } else {
        Err(Status::invalid_argument(format!(
            "{field} must be >= 1, got {id}"
        )))
    }
}

#[tonic::async_trait]
impl Backend for BackendService {
    async fn get_item(
        &self,
        request: Request<GetItemRequest>,
    ) -> Result<Response<GetItemReply>, Status> {
        let timing = timing(&request);
        let id = request.into_inner().id;
        self.serve(&self.get_item, timing, move |b, deadline| async move {
            let id = positive_id("id", id)?;
            let item = b
                .items
                .get_or_load(id, || {
                    // Boxed: the MySQL read's future is many times the size
                    // of the rest of the request's, and every request's
                    // future is moved whole (into its task under
                    // `ignore`), hit or miss. Only a miss allocates this.
                    Box::pin(async {
                        Ok::<_, DbError>(b.db.get_item(id, deadline).await?.map(item_of))
                    })
                })
                .await?
                .ok_or_else(|| Status::not_found(format!("item {id} not found")))?;
            Ok(GetItemReply {
                item: Some(item),
                served_by: b.instance_id.to_string(),
            })
        })
        .await
    }

    async fn submit_job(
        &self,
        request: Request<SubmitJobRequest>,
    ) -> Result<Response<SubmitJobReply>, Status> {
        let timing = timing(&request);
        let payload = request.into_inner().payload;
        // Stored with the row: the job runs later, outside this request,
        // and continues its trace (docs/architecture.md, "Trace ids").
        let traceparent = lab_common::trace::current_traceparent();
        self.serve(&self.submit_job, timing, move |b, deadline| async move {
            if payload.is_empty() {
                return Err(Status::invalid_argument("payload must not be empty"));
            }
            if payload.len() > b.max_payload_bytes {
                return Err(Status::invalid_argument(format!(
                    "payload is {} bytes; the limit is {} (service_b.max_payload_bytes)",
                    payload.len(),
                    b.max_payload_bytes
                )));
            }
            let job_id =
                b.db.insert_job(payload.as_bytes(), traceparent.as_deref(), deadline)
                    .await?;
            tracing::info!(job = job_id, "job submitted");
            Ok(SubmitJobReply {
                job_id,
                served_by: b.instance_id.to_string(),
            })
        })
        .await
    }

    async fn get_job(
        &self,
        request: Request<GetJobRequest>,
    ) -> Result<Response<GetJobReply>, Status> {
        let timing = timing(&request);
        let job_id = request.into_inner().job_id;
        self.serve(&self.get_job, timing, move |b, deadline| async move {
            let id = positive_id("job_id", job_id)?;
            let row =
                b.db.get_job(id, deadline)
                    .await?
                    .ok_or_else(|| Status::not_found(format!("job {id} not found")))?;
            Ok(GetJobReply {
                job: Some(Job {
                    id: row.id,
                    status: row.status,
                    attempts: row.attempts,
                    payload: String::from_utf8_lossy(&row.payload).into_owned(),
                    result: row.result.unwrap_or_default(),
                    created_at_ms: row.created_at_ms,
                    updated_at_ms: row.updated_at_ms,
                }),
                served_by: b.instance_id.to_string(),
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::{DeadlineCut, Failure, Unavailable};

    #[test]
    fn db_errors_keep_their_grpc_codes_and_messages() {
        let exhausted = Status::from(DbError::from(Unavailable::PoolExhausted {
            pool_max: 2,
            acquire_timeout: Duration::from_millis(500),
        }));
        assert_eq!(exhausted.code(), tonic::Code::Unavailable);
        assert!(
            exhausted
                .message()
                .starts_with("MySQL pool exhausted: all 2 connections in use"),
            "{}",
            exhausted.message()
        );
        let cut = Status::from(DbError::from(DeadlineCut::NoTimeLeft));
        assert_eq!(cut.code(), tonic::Code::DeadlineExceeded);
        assert_eq!(
            cut.message(),
            "no time left before the caller's deadline; query skipped"
        );
        let bad = Status::from(DbError::from(Failure::DatabaseName("x;".into())));
        assert_eq!(bad.code(), tonic::Code::Internal);
    }
}
