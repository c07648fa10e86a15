//! Several sources in process: a pool behind one name, and a SyncedClock
//! over several servers that stop agreeing.

use server::{Config, Running, Server};
use service::clock::{Clock, OffsetClock, SystemClock};
use service::ensemble::Ensemble;
use service::select::SelectParams;
use service::source::spec::Resolve;
use service::source::{SourceOptions, SourceSpec, SyncOptions};
use service::synced::{Status, SyncedClock, SyncedClockConfig};
use service::time::Nanos;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

async fn serve(listen: SocketAddr, clock: Arc<dyn Clock>) -> Running {
    Server::spawn(Config {
        listen,
        clock: Some(clock),
        ..Config::default()
    })
    .await
    .expect("server")
}

/// A resolver that knows one name: every address it was given.
struct Table {
    name: &'static str,
    addrs: Vec<SocketAddr>,
}

impl Resolve for Table {
    fn lookup<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>> {
        Box::pin(async move {
            if host == self.name {
                Ok(self
                    .addrs
                    .iter()
                    .map(|a| SocketAddr::new(a.ip(), port))
                    .collect())
            } else {
                Err(io::Error::new(io::ErrorKind::NotFound, "unknown name"))
            }
        })
    }
}

#[tokio::test]
async fn a_pool_name_becomes_one_source_per_address() {
    // Three servers on one port, at three loopback addresses.
    let first = serve("127.0.0.2:0".parse().unwrap(), Arc::new(SystemClock)).await;
    let port = first.addr.port();
    let mut servers = vec![first];
    for ip in ["127.0.0.3", "127.0.0.4"] {
        servers.push(
            serve(
                format!("{ip}:{port}").parse().unwrap(),
                Arc::new(SystemClock),
            )
            .await,
        );
    }
    let resolver = Table {
        name: "pool.test",
        addrs: servers.iter().map(|s| s.addr).collect(),
    };
    let pool: SourceSpec = format!("pool:pool.test:{port}").parse().unwrap();
    assert!(pool.pool);
    let ensemble = Ensemble::open_with(
        std::slice::from_ref(&pool),
        Arc::new(SystemClock),
        SourceOptions::default(),
        SelectParams::default(),
        &resolver,
    )
    .await
    .expect("open");
    let names = ensemble.names();
    assert_eq!(names.len(), 3, "{names:?}");
    assert!(
        names[0].starts_with("127.0.0.2:") && names[0].ends_with(&format!("({pool})")),
        "{names:?}"
    );
    let round = ensemble.sync(&SyncOptions::default()).await;
    let combined = round.combined().expect("synced");
    assert_eq!(combined.agreeing, 3);
    assert!(combined.contains(Nanos::ZERO), "{combined:?}");
    // Named twice (as a pool and one of its addresses), a server is one
    // source: two votes from one clock would fake agreement.
    let twice = Ensemble::open_with(
        &[
            pool,
            SourceSpec::new(service::source::Wire::Cerv, servers[1].addr),
        ],
        Arc::new(SystemClock),
        SourceOptions::default(),
        SelectParams::default(),
        &resolver,
    )
    .await
    .unwrap();
    assert_eq!(twice.members().len(), 3);
}

#[tokio::test]
async fn a_synced_clock_over_several_servers_says_when_they_disagree() {
    let honest: Vec<Running> = {
        let mut v = Vec::new();
        for _ in 0..2 {
            v.push(serve("127.0.0.1:0".parse().unwrap(), Arc::new(SystemClock)).await);
        }
        v
    };
    let moving = Arc::new(OffsetClock::new(SystemClock, Nanos::ZERO));
    let third = serve("127.0.0.1:0".parse().unwrap(), moving.clone()).await;
    let specs: Vec<SourceSpec> = honest
        .iter()
        .chain([&third])
        .map(|s| SourceSpec::new(service::source::Wire::Cerv, s.addr))
        .collect();
    let config = SyncedClockConfig {
        interval: Duration::from_millis(100),
        stale_after: Duration::from_secs(5),
        client: SourceOptions::default(),
        ..SyncedClockConfig::default()
    };
    let synced = SyncedClock::start_sources_with_clock(&specs, Arc::new(SystemClock), config)
        .await
        .expect("start");
    assert!(synced.wait_synchronized(Duration::from_secs(3)).await);
    let truth = |s: &SyncedClock| s.now().contains(SystemClock.now());
    assert!(truth(&synced));
    // One of three lies: still synchronised, still the truth.
    moving.step(Nanos::from_secs(1)).unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(synced.status(), Status::Synchronized);
    assert!(truth(&synced), "{:?}", synced.now());
    // Now two of three disagree with each other and with the third: no
    // majority. The interval is carried, widening, and says so.
    // One honest server stops: two answer, a second apart.
    let mut honest = honest.into_iter();
    drop(honest.next());
    let mut seen = None;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if synced.status() == Status::Disagreement {
            seen = Some(synced.now());
            break;
        }
    }
    let now =
        seen.unwrap_or_else(|| panic!("never saw the disagreement: {:?}", synced.last_error()));
    assert!(now.contains(SystemClock.now()), "{now:?}");
    assert!(
        synced.last_error().unwrap().contains("disagree"),
        "{:?}",
        synced.last_error()
    );
}
