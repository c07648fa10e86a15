//! Ask a cerv server for the time from your own program.
//!
//! ```text
//! cargo run -p server --bin cerv -- --offset +250ms &
//! cargo run -p service --example query -- 127.0.0.1:8081
//! ```

use service::client::{SyncOptions, TimeClient};
use service::transport::client::{UdpClientTransport, client_config};
use service::{TimeServiceClient, Timestamp};
use std::net::SocketAddr;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let server: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8081".into())
        .parse()?;

    // 1. A plain tarpc client over the UDP transport: call the service.
    let transport = UdpClientTransport::connect(server).await?;
    let rpc = TimeServiceClient::new(client_config(), transport).spawn();
    let reply = rpc
        .probe(tarpc::context::current(), Timestamp::EPOCH)
        .await?;
    println!(
        "probe: ts1 {} ts2 {} ts3 {} ts4 {:?}",
        reply.ts1, reply.ts2, reply.ts3, reply.ts4
    );
    println!("now:   {}", rpc.now(tarpc::context::current()).await?);

    // 2. The sync flow, with an honest error bound.
    let client = TimeClient::connect(server).await?;
    let report = client.sync(&SyncOptions::default()).await?;
    println!(
        "offset {:+#} ± {} from {} samples ({} lost)",
        report.estimate.offset,
        report.estimate.bound(),
        report.samples.len(),
        report.lost
    );
    Ok(())
}
