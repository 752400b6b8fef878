//! A fault injected from outside the EMS and the simulator: a Modbus TCP proxy that loses a
//! share of the write requests passing through it (no answer, as when a frame is lost on a
//! bad link), and forwards everything else both ways unchanged.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub struct LossyProxy {
    pub addr: SocketAddr,
    /// Write requests lost and forwarded so far.
    pub dropped: Arc<AtomicU64>,
    pub forwarded: Arc<AtomicU64>,
    accept: JoinHandle<()>,
}

impl LossyProxy {
    /// Listen on a free loopback port and forward to `target`, losing each write request
    /// (function codes 5, 6, 15, 16) with probability `loss`. Call within a Tokio runtime.
    pub fn start(target: SocketAddr, loss: f64, seed: u64) -> LossyProxy {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("proxy addr");
        let listener = TcpListener::from_std(std_listener).expect("tokio listener");
        let dropped = Arc::new(AtomicU64::new(0));
        let forwarded = Arc::new(AtomicU64::new(0));
        let (d, f) = (dropped.clone(), forwarded.clone());
        let accept = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            let mut rng = SmallRng::seed_from_u64(seed);
            while let Ok((client, _)) = listener.accept().await {
                let Ok(upstream) = TcpStream::connect(target).await else {
                    continue;
                };
                let conn_seed = rng.random();
                conns.spawn(relay(
                    client,
                    upstream,
                    loss,
                    conn_seed,
                    d.clone(),
                    f.clone(),
                ));
            }
        });
        LossyProxy {
            addr,
            dropped,
            forwarded,
            accept,
        }
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    pub fn forwarded(&self) -> u64 {
        self.forwarded.load(Ordering::Relaxed)
    }
}

impl Drop for LossyProxy {
    fn drop(&mut self) {
        // The connection tasks live in the accept task's JoinSet and end with it.
        self.accept.abort();
    }
}

async fn relay(
    client: TcpStream,
    upstream: TcpStream,
    loss: f64,
    seed: u64,
    dropped: Arc<AtomicU64>,
    forwarded: Arc<AtomicU64>,
) {
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_upstream, mut to_upstream) = upstream.into_split();
    let answers = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut from_upstream, &mut to_client).await;
    });
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut header = [0u8; 7];
    loop {
        // MBAP header: transaction, protocol, length (unit id + PDU), unit id.
        if from_client.read_exact(&mut header).await.is_err() {
            break;
        }
        let len = u16::from_be_bytes([header[4], header[5]]) as usize;
        let mut pdu = vec![0u8; len.saturating_sub(1)];
        if from_client.read_exact(&mut pdu).await.is_err() {
            break;
        }
        let write = matches!(pdu.first(), Some(5 | 6 | 15 | 16));
        if write && rng.random_bool(loss) {
            dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if write {
            forwarded.fetch_add(1, Ordering::Relaxed);
        }
        if to_upstream.write_all(&header).await.is_err()
            || to_upstream.write_all(&pdu).await.is_err()
        {
            break;
        }
    }
    answers.abort();
}
