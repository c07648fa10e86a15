//! cerv's wire: the tarpc [`TimeService`](crate::rpc::TimeService) over
//! the client transport of [`crate::transport::client`], on UDP or on a
//! connection (TCP, TLS).

use super::{CallError, CallFuture, Exchanger, Probe, SourceOptions};
use crate::auth::Key;
use crate::clock::Clock;
use crate::rpc::TimeServiceClient;
use crate::sync::{NowExchange, Sample};
use crate::transport::client::{
    ClientOptions, ClientStats, ClientTransport, MessageIo, UdpClientTransport, client_config,
};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tarpc::client::RpcError;
use tarpc::context;

/// A tarpc client of one cerv server.
pub(super) struct CervExchanger {
    rpc: TimeServiceClient,
    clock: Arc<dyn Clock>,
}

impl CervExchanger {
    /// Over UDP, counting into `stats`.
    pub(super) async fn open_udp(
        server: SocketAddr,
        clock: Arc<dyn Clock>,
        options: &SourceOptions,
        stats: Arc<ClientStats>,
    ) -> io::Result<Self> {
        let socket = UdpClientTransport::bind_connected(server).await?;
        let transport = UdpClientTransport::new(
            socket,
            clock.clone(),
            ClientOptions {
                stamping: options.stamping,
                key: options.key.clone(),
            },
        )
        .with_stats(stats);
        let rpc = TimeServiceClient::new(client_config(), transport).spawn();
        Ok(CervExchanger { rpc, clock })
    }

    /// Over any message I/O (a framed connection), counting into `stats`.
    /// The connection closes when the exchanger is dropped.
    pub(super) fn over<Io: MessageIo>(
        io: Io,
        clock: Arc<dyn Clock>,
        key: Option<Key>,
        stats: Arc<ClientStats>,
    ) -> Self {
        let transport = ClientTransport::over(
            io,
            clock.clone(),
            ClientOptions {
                key,
                ..ClientOptions::default()
            },
        )
        .with_stats(stats);
        let rpc = TimeServiceClient::new(client_config(), transport).spawn();
        CervExchanger { rpc, clock }
    }
}

fn call_error(e: RpcError) -> CallError {
    match e {
        RpcError::DeadlineExceeded => CallError::Lost,
        RpcError::Server(e) => CallError::Busy(e.detail),
        RpcError::Shutdown | RpcError::Channel(_) => {
            CallError::Failed("the connection was closed".into())
        }
        other => CallError::Failed(other.to_string()),
    }
}

fn deadline(timeout: Duration) -> context::Context {
    let mut ctx = context::current();
    ctx.deadline = Instant::now() + timeout;
    ctx
}

impl Exchanger for CervExchanger {
    fn probe(&self, timeout: Duration) -> CallFuture<'_, Probe> {
        Box::pin(async move {
            // The transport overwrites ts1 just before the datagram leaves.
            let reply = self
                .rpc
                .probe(deadline(timeout), self.clock.now())
                .await
                .map_err(call_error)?;
            let ts4 = reply.ts4.unwrap_or_else(|| self.clock.now());
            let sample =
                Sample::new(reply.ts1, reply.ts2, reply.ts3, ts4).map_err(CallError::Rejected)?;
            Ok(Probe {
                sample,
                server: None,
            })
        })
    }

    fn now(&self, timeout: Duration) -> CallFuture<'_, NowExchange> {
        Box::pin(async move {
            let sent = self.clock.now();
            let server_time = self.rpc.now(deadline(timeout)).await.map_err(call_error)?;
            let received = self.clock.now();
            NowExchange::new(sent, server_time, received).map_err(CallError::Rejected)
        })
    }
}
