//! The bare-transport anchor of `labctl bench grpc`: `lab.v1.Backend` served
//! by tonic with nothing around it — no metrics, tracing, deadline policy,
//! concurrency limit, reflection or health service — answering `GetItem`
//! with a fixed small item. It runs in a process of its own (`labctl bench
//! grpc-echo`), so the load generator loads it the way it loads a B: the
//! same client, method and message shape, from another process.

use std::net::SocketAddr;

use anyhow::Context;
use lab_proto::v1::{
    GetItemReply, GetItemRequest, GetJobReply, GetJobRequest, Item, SubmitJobReply,
    SubmitJobRequest,
    backend_server::{Backend, BackendServer},
};
use tonic::{Request, Response, Status, transport::server::TcpIncoming};

/// What the echo names itself in `served_by`.
pub const SERVED_BY: &str = "echo";

/// Answers `GetItem` and nothing else.
struct Echo;

#[tonic::async_trait]
impl Backend for Echo {
    /// An item the size of a seeded one, built per call as B builds its
    /// reply, so both answers cost the same to encode and send.
    async fn get_item(
        &self,
        request: Request<GetItemRequest>,
    ) -> Result<Response<GetItemReply>, Status> {
        let id = request.into_inner().id;
        Ok(Response::new(GetItemReply {
            item: Some(Item {
                id,
                name: "item-echo".to_owned(),
                price_cents: 4_200,
                description: "A fixed item from the echo.".to_owned(),
            }),
            served_by: SERVED_BY.to_owned(),
        }))
    }

    async fn submit_job(
        &self,
        _request: Request<SubmitJobRequest>,
    ) -> Result<Response<SubmitJobReply>, Status> {
        Err(Status::unimplemented("the echo answers GetItem only"))
    }

    async fn get_job(
        &self,
        _request: Request<GetJobRequest>,
    ) -> Result<Response<GetJobReply>, Status> {
        Err(Status::unimplemented("the echo answers GetItem only"))
    }
}

/// The line the echo prints once it listens; the benchmark reads the
/// address from it (the echo binds port 0, so only it knows the port).
pub fn listening_line(addr: SocketAddr) -> String {
    format!("grpc-echo listening on {addr}")
}

/// The address in a line written by [`listening_line`].
pub fn parse_listening_line(line: &str) -> Option<SocketAddr> {
    line.strip_prefix("grpc-echo listening on ")?
        .trim()
        .parse()
        .ok()
}

/// Binds `listen`, prints [`listening_line`] on stdout and serves until the
/// process is stopped.
pub async fn serve(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    println!("{}", listening_line(addr));
    tonic::transport::Server::builder()
        .add_service(BackendServer::new(Echo))
        .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true)))
        .await
        .context("serving the echo")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listening_line_reads_back() {
        let addr: SocketAddr = "127.0.0.1:43210".parse().expect("addr");
        assert_eq!(parse_listening_line(&listening_line(addr)), Some(addr));
        assert_eq!(parse_listening_line("something else"), None);
    }
}
