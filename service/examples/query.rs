//! Ask a time server for the time from your own program.
//!
//! ```text
//! cargo run -p server --bin cerv -- --offset +250ms --ntp-listen 127.0.0.1:12300 --ntp-stratum 1 &
//! cargo run -p service --example query -- 127.0.0.1:8081
//! cargo run -p service --example query -- ntp://127.0.0.1:12300
//! cargo run -p server --bin cerv -- --listen 127.0.0.1:8082 --tcp-listen 127.0.0.1:8081 &
//! cargo run -p service --example query -- tcp://127.0.0.1:8081
//! ```

use service::source::{Source, SourceSpec, SyncOptions, Wire};
use service::transport::client::{UdpClientTransport, client_config};
use service::transport::stream::connect_tcp;
use service::{TimeServiceClient, Timestamp};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let spec: SourceSpec = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8081".into())
        .parse()?;

    // 1. cerv's wire is a tarpc service: any tarpc client can call it,
    //    over UDP or TCP (TLS: `service::transport::stream::connect_tls`).
    let rpc = match spec.wire {
        Wire::Cerv => {
            let transport = UdpClientTransport::connect(spec.resolve().await?).await?;
            Some(TimeServiceClient::new(client_config(), transport).spawn())
        }
        Wire::Tcp => {
            let transport = connect_tcp(spec.resolve().await?).await?;
            Some(TimeServiceClient::new(client_config(), transport).spawn())
        }
        _ => None,
    };
    if let Some(rpc) = rpc {
        let reply = rpc
            .probe(tarpc::context::current(), Timestamp::EPOCH)
            .await?;
        println!(
            "probe: ts1 {} ts2 {} ts3 {} ts4 {:?}",
            reply.ts1, reply.ts2, reply.ts3, reply.ts4
        );
        println!("now:   {}", rpc.now(tarpc::context::current()).await?);
    }

    // 2. The sync flow over any wire, with an honest error bound.
    let source = Source::connect(spec).await?;
    let report = source.sync(&SyncOptions::default()).await?;
    println!(
        "{}: offset {:+#} ± {} from {} samples ({} lost)",
        source.name(),
        report.estimate.offset,
        report.estimate.bound(),
        report.samples.len(),
        report.lost
    );
    Ok(())
}
