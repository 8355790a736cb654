//! The `lab.v1.Backend` service: validation, MySQL reads and writes, and the
//! per-method metrics. Every reply, success or error, names this instance
//! (`served_by` in the body, `x-served-by` in the metadata).

use std::{future::Future, sync::Arc, time::Instant};

use lab_proto::v1::{
    GetItemReply, GetItemRequest, GetJobReply, GetJobRequest, Item, Job, SubmitJobReply,
    SubmitJobRequest, backend_server::Backend,
};
use tonic::{Request, Response, Status, metadata::MetadataValue};

use crate::{
    db::{Db, DbError},
    metrics::Metrics,
};

/// Request handling state shared by every connection.
pub struct BackendService {
    pub db: Db,
    pub instance_id: Arc<str>,
    pub max_payload_bytes: usize,
    pub handler_latency: std::time::Duration,
    pub metrics: Metrics,
}

impl From<DbError> for Status {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Unavailable(reason) => Status::unavailable(reason),
            DbError::Other(reason) => Status::internal(reason),
        }
    }
}

impl BackendService {
    /// Runs one handler: counts it, times it and stamps `x-served-by` on
    /// the reply or the error.
    async fn observe<T>(
        &self,
        method: &'static str,
        handler: impl Future<Output = Result<T, Status>>,
    ) -> Result<Response<T>, Status> {
        let started = Instant::now();
        if !self.handler_latency.is_zero() {
            tokio::time::sleep(self.handler_latency).await;
        }
        let result = handler.await;
        let code = match &result {
            Ok(_) => tonic::Code::Ok,
            Err(status) => status.code(),
        };
        self.metrics
            .grpc_requests
            .with_label_values(&[method, lab_proto::code_name(code)])
            .inc();
        self.metrics
            .grpc_duration
            .with_label_values(&[method])
            .observe(started.elapsed().as_secs_f64());
        let served_by = MetadataValue::try_from(&*self.instance_id).ok();
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
        let id = request.into_inner().id;
        self.observe("GetItem", async {
            let id = positive_id("id", id)?;
            let row = self
                .db
                .get_item(id)
                .await?
                .ok_or_else(|| Status::not_found(format!("item {id} not found")))?;
            Ok(GetItemReply {
                item: Some(Item {
                    id: row.id,
                    name: row.name,
                    price_cents: row.price_cents,
                    description: row.description,
                }),
                served_by: self.instance_id.to_string(),
            })
        })
        .await
    }

    async fn submit_job(
        &self,
        request: Request<SubmitJobRequest>,
    ) -> Result<Response<SubmitJobReply>, Status> {
        let payload = request.into_inner().payload;
        self.observe("SubmitJob", async {
            if payload.is_empty() {
                return Err(Status::invalid_argument("payload must not be empty"));
            }
            if payload.len() > self.max_payload_bytes {
                return Err(Status::invalid_argument(format!(
                    "payload is {} bytes; the limit is {} (service_b.max_payload_bytes)",
                    payload.len(),
                    self.max_payload_bytes
                )));
            }
            let job_id = self.db.insert_job(payload.as_bytes()).await?;
            Ok(SubmitJobReply {
                job_id,
                served_by: self.instance_id.to_string(),
            })
        })
        .await
    }

    async fn get_job(
        &self,
        request: Request<GetJobRequest>,
    ) -> Result<Response<GetJobReply>, Status> {
        let job_id = request.into_inner().job_id;
        self.observe("GetJob", async {
            let id = positive_id("job_id", job_id)?;
            let row = self
                .db
                .get_job(id)
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
                served_by: self.instance_id.to_string(),
            })
        })
        .await
    }
}
