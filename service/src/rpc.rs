//! The tarpc service: what a time server answers.

use crate::time::Timestamp;
use serde::{Deserialize, Serialize};

/// The time service. `#[tarpc::service]` generates from this trait the
/// client stub [`TimeServiceClient`], the request and response enums
/// [`TimeServiceRequest`] and [`TimeServiceResponse`], and the adaptor
/// `TimeService::serve` that turns an implementation into a tarpc server.
#[tarpc::service]
pub trait TimeService {
    /// One exchange of Cristian's algorithm with NTP's four timestamps.
    ///
    /// The client sends its clock reading `ts1`; the server answers with
    /// `ts1` unchanged, its clock when the request arrived (`ts2`) and when
    /// the reply left (`ts3`). The client notes when the reply arrived
    /// (`ts4`). Over the UDP transport of this crate, `ts1` is overwritten
    /// with a reading taken just before the datagram is sent, `ts2` and
    /// `ts3` are taken by the server's transport next to its socket, and
    /// `ts4` is filled in on receipt; see [`ProbeReply`].
    async fn probe(ts1: Timestamp) -> ProbeReply;

    /// The server's clock, read as late as possible before the reply leaves.
    async fn now() -> Timestamp;
}

/// The answer to [`TimeService::probe`]: `(ts1, ts2, ts3)`, plus the local
/// receipt time when the transport can provide it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeReply {
    /// The client's clock when the request left (echoed by the server).
    pub ts1: Timestamp,
    /// The server's clock when the request arrived.
    pub ts2: Timestamp,
    /// The server's clock when the reply left.
    pub ts3: Timestamp,
    /// The client's clock when the reply arrived, stamped by the client
    /// transport next to its socket. Never sent on the wire: a server
    /// leaves it `None`, and a transport that cannot stamp (tarpc's
    /// in-memory channel, say) leaves it `None` too, in which case the
    /// caller reads its clock when the call returns.
    #[serde(skip)]
    pub ts4: Option<Timestamp>,
}
