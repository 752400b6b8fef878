//! The store's only writer: a thread that owns the writing connection and works through a
//! queue. Nobody who hands it work waits on the disk unless they ask to:
//!
//! - history rows and state changes are queued and written when the file lets us; a file
//!   held locked by another process delays them, it does not lose them (the queue is
//!   bounded; past the bound the oldest history rows go, with a warning);
//! - a demand-response event that is about to be accepted is written with a deadline, and
//!   its sender waits for the outcome: accepted means on disk.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use rusqlite::{Connection, ErrorCode};
use tokio::sync::oneshot;

use super::StoredEvent;

/// History rows kept while the file cannot be written: a week of minutes.
const MAX_QUEUED_SAMPLES: usize = 7 * 24 * 60;
/// Each attempt waits this long on a locked file before the queue is looked at again.
const BUSY_WAIT: Duration = Duration::from_millis(100);
/// Pause after a failure that is not a lock (disk full, read-only, file gone).
const RETRY_AFTER: Duration = Duration::from_secs(1);

type Reply = oneshot::Sender<Result<(), String>>;

enum Op {
    Sample {
        minute: i64,
        values: [f64; 3],
    },
    Event {
        event: StoredEvent,
        /// Someone waits for this one: answer by the deadline, written or not.
        waiting: Option<(Reply, Instant)>,
    },
    /// A unit's own settings (`None`: given back, forget them).
    Originals {
        device: String,
        values: Option<Vec<(u16, u16)>>,
    },
    /// The latest weather forecast, replacing the one before.
    Weather {
        fetched: i64,
        body: String,
    },
    /// An ack waiting for the broker (`None`: the broker has it, forget it).
    Outbox {
        key: String,
        ack: Option<String>,
    },
    /// An export excursion that has ended.
    Excursion(Box<crate::compliance::Excursion>),
    /// Answered once everything queued before it is written.
    Flush(Reply),
}

/// What the writer has done, for status and tests.
#[derive(Debug, Default)]
pub struct WriterStats {
    pub queued: AtomicUsize,
    pub written: AtomicU64,
    pub dropped: AtomicU64,
}

/// A handle to the writer thread. Cloning shares the thread; it ends when every handle is
/// gone and its queue is written (or after a last grace period).
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Op>,
    stats: Arc<WriterStats>,
}

impl Writer {
    /// Start the writer for the file at `path`. Opening happens on the thread and is retried
    /// there, so a file that cannot be opened now delays writes instead of failing start-up.
    pub fn start(path: &Path) -> Writer {
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(WriterStats::default());
        let thread_stats = stats.clone();
        let path = path.to_path_buf();
        let spawned = std::thread::Builder::new()
            .name("ems-store-writer".into())
            .spawn(move || Worker::new(path, rx, thread_stats).run());
        if let Err(e) = spawned {
            tracing::error!("cannot start the store writer: {e}; nothing will be stored");
        }
        Writer { tx, stats }
    }

    pub fn stats(&self) -> &WriterStats {
        &self.stats
    }

    /// Queue one history row (a minute's average). Never blocks.
    pub fn sample(&self, minute: i64, values: [f64; 3]) {
        self.send(Op::Sample { minute, values });
    }

    /// Queue a unit's own settings, learnt at takeover (or `None` once given back).
    pub fn originals(&self, device: &str, values: Option<Vec<(u16, u16)>>) {
        self.send(Op::Originals {
            device: device.to_string(),
            values,
        });
    }

    /// Keep the latest weather forecast, so a restart has one before its first fetch.
    pub fn weather(&self, fetched: i64, body: String) {
        self.send(Op::Weather { fetched, body });
    }

    /// Keep an ack for the aggregator until the broker confirms it (`None`: it has). Never
    /// blocks.
    pub fn outbox(&self, key: &str, ack: Option<String>) {
        self.send(Op::Outbox {
            key: key.to_string(),
            ack,
        });
    }

    /// Keep an export excursion that has ended. Never blocks.
    pub fn excursion(&self, e: crate::compliance::Excursion) {
        self.send(Op::Excursion(Box::new(e)));
    }

    /// Queue an event's new state. Never blocks; written when the file lets us.
    pub fn event_later(&self, event: StoredEvent) {
        self.send(Op::Event {
            event,
            waiting: None,
        });
    }

    /// Write an event and wait until it is on disk, or until `within` has passed (then it
    /// is not written at all).
    pub async fn event_now(&self, event: StoredEvent, within: Duration) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        self.send(Op::Event {
            event,
            waiting: Some((reply, Instant::now() + within)),
        });
        rx.await
            .unwrap_or_else(|_| Err("the store writer has stopped".into()))
    }

    /// Wait until everything queued so far is written, or `within` passes.
    pub async fn flush(&self, within: Duration) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        self.send(Op::Flush(reply));
        match tokio::time::timeout(within, rx).await {
            Ok(r) => r.unwrap_or_else(|_| Err("the store writer has stopped".into())),
            Err(_) => Err(format!(
                "store not flushed within {} s: {} writes still queued",
                within.as_secs_f64(),
                self.stats.queued.load(Ordering::Relaxed)
            )),
        }
    }

    fn send(&self, op: Op) {
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        if let Err(mpsc::SendError(op)) = self.tx.send(op) {
            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
            match op {
                Op::Event {
                    waiting: Some((reply, _)),
                    ..
                }
                | Op::Flush(reply) => {
                    let _ = reply.send(Err("the store writer has stopped".into()));
                }
                _ => tracing::error!("store writer stopped: a write was lost"),
            }
        }
    }
}

struct Worker {
    path: PathBuf,
    rx: mpsc::Receiver<Op>,
    stats: Arc<WriterStats>,
    queue: VecDeque<Op>,
    conn: Option<Connection>,
    /// Why the last attempt failed, for the log (said once per kind of failure).
    last_error: Option<String>,
}

/// How one attempt at the head of the queue went.
enum Attempt {
    Done,
    /// The file is locked by someone else: try again shortly.
    Busy,
    /// Any other failure: try again later.
    Failed(String),
}

impl Worker {
    fn new(path: PathBuf, rx: mpsc::Receiver<Op>, stats: Arc<WriterStats>) -> Worker {
        Worker {
            path,
            rx,
            stats,
            queue: VecDeque::new(),
            conn: None,
            last_error: None,
        }
    }

    fn run(mut self) {
        let mut closed = false;
        let mut closing_since: Option<Instant> = None;
        loop {
            if self.queue.is_empty() {
                if closed {
                    return;
                }
                match self.rx.recv() {
                    Ok(op) => self.push(op),
                    Err(_) => return,
                }
            }
            loop {
                match self.rx.try_recv() {
                    Ok(op) => self.push(op),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        closed = true;
                        break;
                    }
                }
            }
            if closed {
                // Every handle is gone: write what is left, for a while.
                let since = *closing_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_secs(5) {
                    tracing::error!(
                        "store writer stopping with {} writes not done",
                        self.queue.len()
                    );
                    return;
                }
            }
            self.expire();
            match self.attempt() {
                Attempt::Done => {
                    self.last_error = None;
                    if let Some(op) = self.queue.pop_front() {
                        self.finish(op, Ok(()));
                    }
                }
                Attempt::Busy => self.wait(BUSY_WAIT, &mut closed),
                Attempt::Failed(why) => {
                    if self.last_error.as_deref() != Some(why.as_str()) {
                        tracing::warn!(
                            "store {}: write failed, will retry: {why}",
                            self.path.display()
                        );
                        self.last_error = Some(why.clone());
                    }
                    // Someone waiting is told now; queued rows are retried.
                    if let Some(Op::Event {
                        waiting: Some(_), ..
                    }) = self.queue.front()
                    {
                        if let Some(op) = self.queue.pop_front() {
                            self.finish(op, Err(why));
                        }
                        continue;
                    }
                    self.conn = None;
                    self.wait(RETRY_AFTER, &mut closed);
                }
            }
        }
    }

    /// Wait for `d`, taking new work as it comes.
    fn wait(&mut self, d: Duration, closed: &mut bool) {
        if *closed {
            std::thread::sleep(d);
            return;
        }
        match self.rx.recv_timeout(d) {
            Ok(op) => self.push(op),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => *closed = true,
        }
    }

    fn push(&mut self, op: Op) {
        if matches!(op, Op::Sample { .. }) {
            let samples = self
                .queue
                .iter()
                .filter(|o| matches!(o, Op::Sample { .. }))
                .count();
            if samples >= MAX_QUEUED_SAMPLES {
                if let Some(i) = self
                    .queue
                    .iter()
                    .position(|o| matches!(o, Op::Sample { .. }))
                {
                    self.queue.remove(i);
                    self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                    self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        self.queue.push_back(op);
    }

    /// Writes whose sender stopped waiting are not made at all.
    fn expire(&mut self) {
        let now = Instant::now();
        let mut kept = VecDeque::with_capacity(self.queue.len());
        while let Some(op) = self.queue.pop_front() {
            match op {
                Op::Event {
                    waiting: Some((reply, deadline)),
                    event,
                } if now >= deadline || reply.is_closed() => {
                    self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                    let _ = reply.send(Err(format!(
                        "the store could not write event `{}` in time{}",
                        event.id,
                        self.last_error
                            .as_deref()
                            .map(|e| format!(": {e}"))
                            .unwrap_or_default()
                    )));
                }
                op => kept.push_back(op),
            }
        }
        self.queue = kept;
    }

    fn attempt(&mut self) -> Attempt {
        let Some(op) = self.queue.front() else {
            return Attempt::Done;
        };
        if matches!(op, Op::Flush(_)) {
            return Attempt::Done;
        }
        if self.conn.is_none() {
            match super::open_connection(&self.path, BUSY_WAIT) {
                Ok(c) => self.conn = Some(c),
                Err(e) => return classify(e),
            }
        }
        let Some(conn) = self.conn.as_ref() else {
            return Attempt::Failed("no connection".into());
        };
        let result = match op {
            Op::Sample { minute, values } => super::write_sample(conn, *minute, *values),
            Op::Event { event, .. } => super::write_dr_event(conn, event),
            Op::Originals { device, values } => {
                super::write_originals(conn, device, values.as_deref())
            }
            Op::Outbox { key, ack } => super::write_outbox(conn, key, ack.as_deref()),
            Op::Excursion(e) => super::write_excursion(conn, e),
            Op::Weather { fetched, body } => super::write_weather(conn, *fetched, body),
            Op::Flush(_) => Ok(()),
        };
        match result {
            Ok(()) => Attempt::Done,
            Err(e) => classify(e),
        }
    }

    fn finish(&mut self, op: Op, result: Result<(), String>) {
        self.stats.queued.fetch_sub(1, Ordering::Relaxed);
        match op {
            Op::Sample { .. }
            | Op::Event { waiting: None, .. }
            | Op::Originals { .. }
            | Op::Outbox { .. }
            | Op::Excursion(_)
            | Op::Weather { .. } => {
                self.stats.written.fetch_add(1, Ordering::Relaxed);
            }
            Op::Event {
                waiting: Some((reply, _)),
                ..
            } => {
                if result.is_ok() {
                    self.stats.written.fetch_add(1, Ordering::Relaxed);
                }
                let _ = reply.send(result);
            }
            Op::Flush(reply) => {
                let _ = reply.send(result);
            }
        }
    }
}

fn classify(e: rusqlite::Error) -> Attempt {
    match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => Attempt::Busy,
        _ => Attempt::Failed(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str) -> StoredEvent {
        StoredEvent {
            id: id.into(),
            json: "{}".into(),
            state: "accepted".into(),
        }
    }

    #[tokio::test]
    async fn rows_wait_out_a_lock_and_a_waiting_event_gives_up_at_its_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sqlite");
        let w = Writer::start(&path);
        w.event_now(event("before"), Duration::from_secs(5))
            .await
            .unwrap();
        let holder = Connection::open(&path).unwrap();
        holder.execute_batch("BEGIN EXCLUSIVE").unwrap();
        w.sample(60, [1.0, 2.0, 3.0]);
        let refused = w
            .event_now(event("during"), Duration::from_millis(300))
            .await;
        assert!(refused.unwrap_err().contains("in time"));
        holder.execute_batch("COMMIT").unwrap();
        w.flush(Duration::from_secs(5)).await.unwrap();
        let s = super::super::Store::open(&path).unwrap();
        assert_eq!(s.count().unwrap(), 1, "the row queued during the lock");
        let ids: Vec<String> = s.dr_events().unwrap().into_iter().map(|e| e.id).collect();
        assert_eq!(ids, ["before"], "the refused event was never written");
    }

    #[tokio::test]
    async fn the_latest_weather_forecast_is_kept_for_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sqlite");
        let w = Writer::start(&path);
        w.weather(1_000, "first".into());
        w.weather(2_000, "second".into());
        w.flush(Duration::from_secs(5)).await.unwrap();
        let s = super::super::Store::open(&path).unwrap();
        let (body, at) = s.weather().unwrap().expect("a forecast kept");
        assert_eq!((body.as_str(), at.timestamp()), ("second", 2_000));
    }
}
