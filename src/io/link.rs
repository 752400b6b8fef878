//! Modbus links: one task per transport (a TCP endpoint or an RS485 pair) that owns the
//! connection and serialises requests, so there is never more than one in flight per link.
//! Each request has a timeout. How often a failing device is retried is the poller's call
//! (on the injected clock); the link just connects when asked.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::{timeout, Instant};
use tokio_modbus::client::{Context, Reader, Writer};
use tokio_modbus::prelude::SlaveContext;
use tokio_modbus::{ExceptionCode, Slave};

use crate::config::{LinkConfig, LinkKind, Parity};
use crate::drivers::{ReadBlock, Table};
use crate::io::IoObserver;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LinkError {
    #[error("no answer within {0} ms")]
    Timeout(u64),
    #[error("Modbus exception {0:#04x}")]
    Exception(u8),
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("transport error: {0}")]
    Transport(String),
    #[error("link task stopped")]
    Closed,
}

impl LinkError {
    /// Bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            LinkError::Timeout(_) => "timeout",
            LinkError::Exception(_) => "exception",
            LinkError::Connect(_) => "connect",
            LinkError::Transport(_) => "transport",
            LinkError::Closed => "closed",
        }
    }

    pub fn is_illegal_function(&self) -> bool {
        *self == LinkError::Exception(u8::from(ExceptionCode::IllegalFunction))
    }

    pub fn is_illegal_address(&self) -> bool {
        *self == LinkError::Exception(u8::from(ExceptionCode::IllegalDataAddress))
    }
}

#[derive(Debug, Clone)]
enum Op {
    Read(ReadBlock),
    Write { addr: u16, value: u16 },
    WriteMany { addr: u16, values: Arc<[u16]> },
}

struct Job {
    device: Arc<str>,
    unit: u8,
    op: Op,
    reply: oneshot::Sender<Result<Vec<u16>, LinkError>>,
}

/// A handle to a link task. Cloning shares the task.
#[derive(Clone)]
pub struct Link {
    name: Arc<str>,
    tx: mpsc::Sender<Job>,
    /// RTU only: the computed wire time of every transaction so far, in nanoseconds.
    wire_ns: Arc<AtomicU64>,
}

impl Link {
    /// Start the task for `cfg`. It runs until every handle is dropped.
    pub fn spawn(cfg: &LinkConfig, observer: Option<Arc<dyn IoObserver>>) -> Link {
        let (tx, rx) = mpsc::channel(64);
        let name: Arc<str> = Arc::from(cfg.name.as_str());
        let wire_ns = Arc::new(AtomicU64::new(0));
        tokio::spawn(run(cfg.clone(), rx, observer, wire_ns.clone()));
        Link { name, tx, wire_ns }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Wire time of all RTU transactions so far (zero on TCP): the floor any cycle on this
    /// bus can reach.
    pub fn wire_time(&self) -> Duration {
        Duration::from_nanos(self.wire_ns.load(Ordering::Relaxed))
    }

    pub async fn read(
        &self,
        device: &Arc<str>,
        unit: u8,
        block: ReadBlock,
    ) -> Result<Vec<u16>, LinkError> {
        self.call(device, unit, Op::Read(block)).await
    }

    /// FC06 write of one register. Callers pass values already range-checked by the driver.
    pub async fn write(
        &self,
        device: &Arc<str>,
        unit: u8,
        addr: u16,
        value: u16,
    ) -> Result<(), LinkError> {
        self.call(device, unit, Op::Write { addr, value })
            .await
            .map(|_| ())
    }

    /// FC16 write of consecutive registers, applied by the device as one (SunSpec controls
    /// whose value, enable and timer belong together). Values are range-checked by the driver.
    pub async fn write_many(
        &self,
        device: &Arc<str>,
        unit: u8,
        addr: u16,
        values: &[u16],
    ) -> Result<(), LinkError> {
        let values: Arc<[u16]> = Arc::from(values);
        self.call(device, unit, Op::WriteMany { addr, values })
            .await
            .map(|_| ())
    }

    async fn call(&self, device: &Arc<str>, unit: u8, op: Op) -> Result<Vec<u16>, LinkError> {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            device: device.clone(),
            unit,
            op,
            reply,
        };
        self.tx.send(job).await.map_err(|_| LinkError::Closed)?;
        rx.await.map_err(|_| LinkError::Closed)?
    }
}

/// What an RTU transaction carries, for its size on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// FC03/FC04 of this many registers.
    Read(u16),
    /// FC01/FC02 of this many bits.
    ReadBits(u16),
    /// FC06.
    WriteSingle,
    /// FC16 of this many registers.
    WriteMultiple(u16),
}

/// Bytes of the request and of the answer (an exception answer is 5 bytes).
pub fn rtu_frame_bytes(frame: Frame, exception: bool) -> (usize, usize) {
    let (request, response) = match frame {
        Frame::Read(n) => (8, 5 + 2 * n as usize),
        Frame::ReadBits(n) => (8, 5 + (n as usize).div_ceil(8)),
        Frame::WriteSingle => (8, 8),
        Frame::WriteMultiple(n) => (9 + 2 * n as usize, 8),
    };
    (request, if exception { 5 } else { response })
}

/// Time on the wire of one RTU transaction: request and answer at 11 bits a character, each
/// followed by the 3.5-character silence (the slave's own turnaround is not included).
pub fn rtu_wire_time(baud: u32, request_bytes: usize, response_bytes: usize) -> Duration {
    let char_s = 11.0 / f64::from(baud.max(1));
    let frames = (request_bytes + response_bytes) as f64 * char_s;
    let gaps = if response_bytes > 0 { 2.0 } else { 1.0 } * inter_frame_gap(baud).as_secs_f64();
    Duration::from_secs_f64(frames + gaps)
}

/// Silence after each RTU transaction: 3.5 character times (11 bits each), and at least
/// 1.75 ms above 19200 baud, per the Modbus serial-line rule.
pub fn inter_frame_gap(baud: u32) -> Duration {
    if baud > 19_200 {
        Duration::from_micros(1750)
    } else {
        Duration::from_secs_f64(3.5 * 11.0 / f64::from(baud.max(1)))
    }
}

async fn connect(cfg: &LinkConfig) -> std::io::Result<Context> {
    match cfg.kind {
        LinkKind::Tcp => {
            let (host, port) = cfg.tcp_endpoint().ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "tcp link without a host")
            })?;
            let addr = tokio::net::lookup_host((host, port))
                .await?
                .next()
                .ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::NotFound, format!("{host}: no address"))
                })?;
            let stream = tokio::net::TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            Ok(tokio_modbus::client::tcp::attach(stream))
        }
        LinkKind::Rtu => {
            use tokio_serial::SerialPortBuilderExt;
            let device = cfg.serial_device().ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "rtu link without a device",
                )
            })?;
            let port = tokio_serial::new(device, cfg.baud_rate())
                .data_bits(tokio_serial::DataBits::Eight)
                .parity(match cfg.parity {
                    Parity::None => tokio_serial::Parity::None,
                    Parity::Even => tokio_serial::Parity::Even,
                    Parity::Odd => tokio_serial::Parity::Odd,
                })
                .stop_bits(if cfg.two_stop_bits() {
                    tokio_serial::StopBits::Two
                } else {
                    tokio_serial::StopBits::One
                })
                .open_native_async()
                .map_err(std::io::Error::other)?;
            Ok(tokio_modbus::client::rtu::attach(port))
        }
    }
}

async fn execute(ctx: &mut Context, op: Op) -> tokio_modbus::Result<Vec<u16>> {
    match op {
        Op::Read(b) => match b.table {
            Table::Holding => ctx.read_holding_registers(b.start, b.count).await,
            Table::Input => ctx.read_input_registers(b.start, b.count).await,
            Table::Discrete => ctx
                .read_discrete_inputs(b.start, b.count)
                .await
                .map(|r| r.map(|bits| bits.into_iter().map(u16::from).collect())),
        },
        Op::Write { addr, value } => ctx
            .write_single_register(addr, value)
            .await
            .map(|r| r.map(|()| Vec::new())),
        Op::WriteMany { addr, values } => ctx
            .write_multiple_registers(addr, &values)
            .await
            .map(|r| r.map(|()| Vec::new())),
    }
}

async fn run(
    cfg: LinkConfig,
    mut rx: mpsc::Receiver<Job>,
    observer: Option<Arc<dyn IoObserver>>,
    wire_ns: Arc<AtomicU64>,
) {
    let request_timeout = Duration::from_millis(cfg.timeout_ms());
    let baud = cfg.baud_rate();
    let gap = match cfg.kind {
        LinkKind::Rtu => Some(cfg.gap_ms.map_or_else(
            || inter_frame_gap(baud),
            |ms| Duration::from_secs_f64(ms / 1000.0),
        )),
        LinkKind::Tcp => None,
    };
    let mut ctx: Option<Context> = None;

    while let Some(job) = rx.recv().await {
        let started = Instant::now();
        let result = 'job: {
            if ctx.is_none() {
                match timeout(request_timeout, connect(&cfg)).await {
                    Ok(Ok(c)) => ctx = Some(c),
                    outcome => {
                        let why = match outcome {
                            Ok(Err(e)) => e.to_string(),
                            _ => "timed out".to_string(),
                        };
                        break 'job Err(LinkError::Connect(why));
                    }
                }
            }
            let Some(c) = ctx.as_mut() else {
                break 'job Err(LinkError::Closed);
            };
            c.set_slave(Slave(job.unit));
            match timeout(request_timeout, execute(c, job.op.clone())).await {
                Ok(Ok(Ok(words))) => Ok(words),
                Ok(Ok(Err(exception))) => Err(LinkError::Exception(u8::from(exception))),
                Ok(Err(e)) => {
                    ctx = None;
                    Err(LinkError::Transport(e.to_string()))
                }
                Err(_) => {
                    // A late answer would be taken for the next request's: start afresh.
                    ctx = None;
                    Err(LinkError::Timeout(request_timeout.as_millis() as u64))
                }
            }
        };
        if let Some(o) = &observer {
            o.request(
                &cfg.name,
                &job.device,
                result.as_ref().map(|_| ()),
                started.elapsed(),
            );
        }
        if let Some(gap) = gap {
            let frame = match &job.op {
                Op::Read(b) if b.table == Table::Discrete => Frame::ReadBits(b.count),
                Op::Read(b) => Frame::Read(b.count),
                Op::Write { .. } => Frame::WriteSingle,
                Op::WriteMany { values, .. } => Frame::WriteMultiple(values.len() as u16),
            };
            let (request, response) = match &result {
                Ok(_) => rtu_frame_bytes(frame, false),
                Err(LinkError::Exception(_)) => rtu_frame_bytes(frame, true),
                // Nothing (or nothing valid) came back: only the request was on the wire.
                Err(_) => (rtu_frame_bytes(frame, false).0, 0),
            };
            let wire = rtu_wire_time(baud, request, response);
            wire_ns.fetch_add(wire.as_nanos() as u64, Ordering::Relaxed);
            // The answer is complete: hand it over, then keep the bus silent before the
            // next request.
            let _ = job.reply.send(result);
            tokio::time::sleep(gap).await;
            continue;
        }
        let _ = job.reply.send(result);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_time_matches_the_worked_example() {
        // a 60-register read at 9600 baud is about 160 ms on the wire.
        let (req, resp) = rtu_frame_bytes(Frame::Read(60), false);
        let t = rtu_wire_time(9600, req, resp).as_secs_f64();
        assert!((t - 0.160).abs() < 0.002, "{t}");
    }

    #[test]
    fn rtu_gap_follows_the_serial_line_rule() {
        // 9600 baud: 3.5 × 11 bits ≈ 4.01 ms; above 19200 fixed at 1.75 ms.
        assert!((inter_frame_gap(9600).as_secs_f64() - 0.004_010).abs() < 1e-5);
        assert_eq!(inter_frame_gap(115_200), Duration::from_micros(1750));
    }
}
