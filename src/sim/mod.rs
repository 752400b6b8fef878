//! A simulated site: every inverter and meter of a site file served as a real Modbus TCP
//! slave on its own loopback port, over the physics of [`physics::SiteModel`].
//!
//! Tests and demos drive it through [`SimSite`]: stop or silence a device, script a load
//! step, pause time and read the ground truth.

pub mod fleet;
pub mod lockstep;
pub mod physics;
pub mod pty;
pub mod registers;
mod rtu_bus;
pub mod sunspec;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_modbus::server::tcp::{accept_tcp_connection, Server};
use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};

use crate::clock::Clock;
use crate::config::{LinkConfig, LinkKind, MeterModel, MeterRole, Parity, SiteConfig};
use physics::SiteModel;

/// A simulated site ready for the EMS: the simulator, the site file rewritten to reach it,
/// and the pseudo-terminal buses it runs on (closed when this is dropped).
pub struct Launched {
    pub sim: SimSite,
    /// The site file with every link pointing at the simulator.
    pub config: SiteConfig,
    /// RTU links served on a pty: (link name, the master end a Modbus master opens).
    pub buses: Vec<(String, PathBuf)>,
    _pairs: Vec<pty::PtyPair>,
}

/// Start a simulated site for `config`: RTU links on socat pty pairs when socat is there
/// (over TCP otherwise, with a warning), every other device on its own TCP port.
pub async fn launch(config: &SiteConfig, port_base: Option<u16>) -> std::io::Result<Launched> {
    let mut config = config.clone();
    let mut rtu = HashMap::new();
    let mut buses = Vec::new();
    let mut pairs = Vec::new();
    for link in config.links.iter_mut().filter(|l| l.kind == LinkKind::Rtu) {
        match pty::PtyPair::new() {
            Ok(pair) => {
                link.device = Some(pair.master.display().to_string());
                rtu.insert(link.name.clone(), pair.slave.clone());
                buses.push((link.name.clone(), pair.master.clone()));
                pairs.push(pair);
            }
            Err(e) => tracing::warn!(
                "cannot make a pty pair for RS485 link {} ({e}; is socat installed?): its devices are simulated over TCP",
                link.name
            ),
        }
    }
    let sim = SimSite::start_with(&config, port_base, &rtu).await?;
    Ok(Launched {
        config: sim.rewire(&config),
        sim,
        buses,
        _pairs: pairs,
    })
}

/// Device id of the simulated contact module.
pub const CONTACTS_ID: &str = "dr-contacts";

/// How a simulated device answers, for failure tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    Normal,
    /// Accepts requests and never answers (a hung gateway or firmware).
    Silent,
    /// Answers every request with this exception code.
    Exception(u8),
    /// Answers reads with 0xFFFF in every register.
    Garbage,
    /// Answers every read with the values it had when it froze (a gateway serving its
    /// cache after losing the device behind it).
    Frozen,
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    Inverter(usize),
    /// A digital-input module (DRED / ripple-control contacts).
    Contacts,
    Meter {
        model: MeterModel,
        role: MeterRole,
    },
}

pub(crate) struct Device {
    id: String,
    unit: u8,
    kind: Kind,
    /// The site file's link name: devices on one RTU link share a bus.
    link: String,
    behaviour: Behaviour,
    /// Served on an RTU bus rather than its own TCP port.
    rtu: bool,
    /// An RTU device taken off its bus: it hears requests and answers none.
    unplugged: bool,
    /// Discrete inputs (contact modules).
    inputs: Vec<bool>,
    /// What a frozen device keeps serving.
    frozen: Option<registers::Image>,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
}

/// One write as it arrived on the wire, and whether the simulated firmware took it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteRecord {
    pub device: String,
    pub addr: u16,
    pub value: u16,
    pub accepted: bool,
}

pub(crate) struct World {
    model: SiteModel,
    /// Lock-step harnesses let time run as on the wall clock while the EMS works: since this
    /// instant, from this model time.
    real_time_since: Option<(std::time::Instant, chrono::DateTime<chrono::Utc>)>,
    writes: Vec<WriteRecord>,
    /// What the grid meter showed each time it was read: (site time, power per phase,
    /// + import). Bounded.
    grid_reads: Vec<(chrono::DateTime<chrono::Utc>, [f64; 3])>,
    started: chrono::DateTime<chrono::Utc>,
    devices: Vec<Device>,
    paused: bool,
    time_factor: f64,
}

/// A running simulated site. Dropping it stops every server.
pub struct SimSite {
    world: Arc<Mutex<World>>,
    ticker: JoinHandle<()>,
    buses: Vec<JoinHandle<()>>,
}

/// Physics tick in real time.
const TICK: Duration = Duration::from_millis(100);

pub(crate) fn lock(world: &Mutex<World>) -> MutexGuard<'_, World> {
    // A panic while holding the lock leaves plain numbers behind; keep serving them.
    world.lock().unwrap_or_else(|e| e.into_inner())
}

impl SimSite {
    /// Start the simulated site: physics ticking in real time × `time_factor`, and one
    /// Modbus TCP slave per device on `127.0.0.1`, each on a port the OS picks.
    pub async fn start(config: &SiteConfig) -> std::io::Result<SimSite> {
        SimSite::start_with(config, None, &HashMap::new()).await
    }

    /// As [`SimSite::start`], with device `k` (meters first, then inverters, in file order)
    /// on port `port_base + k` when a base is given, so other tools can find it.
    pub async fn start_on(config: &SiteConfig, port_base: Option<u16>) -> std::io::Result<SimSite> {
        SimSite::start_with(config, port_base, &HashMap::new()).await
    }

    /// As [`SimSite::start_on`], and the devices of each RTU link named in `rtu` served as
    /// Modbus RTU slaves sharing one serial device (the slave end of that bus), at the link's
    /// baud rate and with its wire time.
    pub async fn start_with(
        config: &SiteConfig,
        port_base: Option<u16>,
        rtu: &HashMap<String, PathBuf>,
    ) -> std::io::Result<SimSite> {
        let mut devices = Vec::new();
        for m in &config.meters {
            devices.push(Device {
                id: m.id.clone(),
                unit: m.unit_id,
                kind: Kind::Meter {
                    model: m.model,
                    role: m.role,
                },
                link: m.link.clone(),
                rtu: rtu.contains_key(&m.link),
                unplugged: false,
                inputs: Vec::new(),
                frozen: None,
                behaviour: Behaviour::Normal,
                addr: SocketAddr::from(([127, 0, 0, 1], 0)),
                stop: None,
            });
        }
        for (i, inv) in config.inverters.iter().enumerate() {
            devices.push(Device {
                id: inv.id.clone(),
                unit: inv.unit_id,
                kind: Kind::Inverter(i),
                link: inv.link.clone(),
                rtu: rtu.contains_key(&inv.link),
                unplugged: false,
                inputs: Vec::new(),
                frozen: None,
                behaviour: Behaviour::Normal,
                addr: SocketAddr::from(([127, 0, 0, 1], 0)),
                stop: None,
            });
        }
        if let Some(k) = config.dr.as_ref().and_then(|d| d.contacts.as_ref()) {
            devices.push(Device {
                id: CONTACTS_ID.into(),
                unit: k.unit_id,
                kind: Kind::Contacts,
                link: k.link.clone(),
                rtu: rtu.contains_key(&k.link),
                unplugged: false,
                inputs: vec![false; usize::from(k.span().map_or(0, |(lo, n)| lo + n))],
                frozen: None,
                behaviour: Behaviour::Normal,
                addr: SocketAddr::from(([127, 0, 0, 1], 0)),
                stop: None,
            });
        }
        let model = SiteModel::new(config);
        let world = Arc::new(Mutex::new(World {
            real_time_since: None,
            started: model.now,
            model,
            writes: Vec::new(),
            grid_reads: Vec::new(),
            devices,
            paused: false,
            time_factor: config.simulation.time_factor.max(0.0),
        }));
        let count = lock(&world).devices.len();
        for index in 0..count {
            if lock(&world).devices[index].rtu {
                continue;
            }
            let port = match port_base {
                Some(base) => base.checked_add(index as u16).ok_or_else(|| {
                    std::io::Error::other("port base too high for this many devices")
                })?,
                None => 0,
            };
            serve(&world, index, SocketAddr::from(([127, 0, 0, 1], port))).await?;
        }
        let mut buses = Vec::new();
        for (link, path) in rtu {
            let cfg = config.link(link).ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("no link named {link}"),
                )
            })?;
            let port = rtu_bus::open(path, cfg.baud_rate())?;
            buses.push(tokio::spawn(rtu_bus::serve(
                world.clone(),
                link.clone(),
                path.clone(),
                cfg.baud_rate(),
                port,
            )));
        }
        let ticker = tokio::spawn(tick(world.clone()));
        Ok(SimSite {
            world,
            ticker,
            buses,
        })
    }

    /// The loopback address a device is served on.
    pub fn addr(&self, id: &str) -> Option<SocketAddr> {
        lock(&self.world)
            .devices
            .iter()
            .find(|d| d.id == id)
            .map(|d| d.addr)
    }

    /// The simulated site's clock, for the EMS under `--simulate`.
    pub fn clock(&self) -> Arc<dyn Clock> {
        Arc::new(SimClock(self.world.clone()))
    }

    /// Every device's id, unit id and address.
    pub fn device_units(&self) -> Vec<(String, u8, SocketAddr)> {
        lock(&self.world)
            .devices
            .iter()
            .map(|d| (d.id.clone(), d.unit, d.addr))
            .collect()
    }

    /// Unplug a device: close its TCP port and connections, or take it off its RTU bus.
    pub fn stop_device(&self, id: &str) -> bool {
        let mut w = lock(&self.world);
        match w.devices.iter_mut().find(|d| d.id == id) {
            Some(d) => {
                d.unplugged = true;
                if let Some(stop) = d.stop.take() {
                    let _ = stop.send(());
                }
                true
            }
            None => false,
        }
    }

    /// Serve a stopped device again on its old port.
    pub async fn restart_device(&self, id: &str) -> std::io::Result<()> {
        let (index, addr) = {
            let w = lock(&self.world);
            let index =
                w.devices.iter().position(|d| d.id == id).ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::NotFound, id.to_string())
                })?;
            (index, w.devices[index].addr)
        };
        let rtu = {
            let mut w = lock(&self.world);
            w.devices[index].unplugged = false;
            w.devices[index].rtu
        };
        if rtu {
            return Ok(());
        }
        serve(&self.world, index, addr).await
    }

    pub fn set_behaviour(&self, id: &str, behaviour: Behaviour) {
        let mut w = lock(&self.world);
        let w = &mut *w;
        if let Some(d) = w.devices.iter_mut().find(|d| d.id == id) {
            d.behaviour = behaviour;
            d.frozen = (behaviour == Behaviour::Frozen).then(|| image(&w.model, d.kind, d.unit));
        }
    }

    /// Let simulated time run with the wall clock (while paused), so that whatever the EMS
    /// awaits — reads, writes, a stall — takes site time too. See [`SimSite::freeze`].
    pub fn run_in_real_time(&self) {
        let mut w = lock(&self.world);
        let now = w.model.now;
        w.real_time_since = Some((std::time::Instant::now(), now));
    }

    /// Stop the wall clock's run: bring the physics up to now and hold it. Returns the site
    /// seconds that passed since [`SimSite::run_in_real_time`].
    pub fn freeze(&self) -> f64 {
        let mut w = lock(&self.world);
        catch_up(&mut w);
        let Some((_, from)) = w.real_time_since.take() else {
            return 0.0;
        };
        (w.model.now - from).num_microseconds().unwrap_or(0) as f64 / 1e6
    }

    /// Stop or resume simulated time.
    pub fn set_paused(&self, paused: bool) {
        lock(&self.world).paused = paused;
    }

    /// Advance simulated time by `dt_s` in physics ticks (use with [`SimSite::set_paused`]
    /// to run the site faster than real time).
    pub fn advance(&self, dt_s: f64) {
        let mut w = lock(&self.world);
        let tick = TICK.as_secs_f64();
        let mut left = dt_s;
        while left > 1e-9 {
            let d = left.min(tick);
            w.model.step(d);
            left -= d;
        }
    }

    /// Close or open a contact of the simulated DRED / ripple-control input module.
    pub fn set_contact(&self, addr: u16, closed: bool) {
        let mut w = lock(&self.world);
        if let Some(d) = w.devices.iter_mut().find(|d| d.id == CONTACTS_ID) {
            if let Some(bit) = d.inputs.get_mut(usize::from(addr)) {
                *bit = closed;
            }
        }
    }

    /// Every write received so far, in order.
    pub fn writes(&self) -> Vec<WriteRecord> {
        lock(&self.world).writes.clone()
    }

    /// Every reading the grid meter served, in order: (site time, power per phase, + import).
    pub fn grid_meter_reads(&self) -> Vec<(chrono::DateTime<chrono::Utc>, [f64; 3])> {
        lock(&self.world).grid_reads.clone()
    }

    /// Read or change the physics (load steps, faults, ground truth).
    pub fn with_model<T>(&self, f: impl FnOnce(&mut SiteModel) -> T) -> T {
        f(&mut lock(&self.world).model)
    }

    /// Links that reach every simulated device, one TCP link each: the site file with its
    /// real transports swapped for the simulator's loopback ports.
    pub fn rewire(&self, config: &SiteConfig) -> SiteConfig {
        let mut c = config.clone();
        let (served_on_tcp, rtu_links): (Vec<(String, SocketAddr)>, Vec<String>) = {
            let w = lock(&self.world);
            (
                w.devices
                    .iter()
                    .filter(|d| !d.rtu)
                    .map(|d| (d.id.clone(), d.addr))
                    .collect(),
                w.devices
                    .iter()
                    .filter(|d| d.rtu)
                    .map(|d| d.link.clone())
                    .collect(),
            )
        };
        // Links of RTU-served devices stay as they are: the EMS opens the other end of the bus.
        c.links.retain(|l| rtu_links.contains(&l.name));
        for (id, addr) in served_on_tcp {
            let name = format!("sim-{id}");
            c.links.push(LinkConfig {
                name: name.clone(),
                kind: LinkKind::Tcp,
                host: Some(addr.ip().to_string()),
                port: Some(addr.port()),
                device: None,
                baud: None,
                parity: Parity::None,
                stop_bits: None,
                timeout_ms: Some(300),
                gap_ms: None,
            });
            if id == CONTACTS_ID {
                if let Some(k) = c.dr.as_mut().and_then(|d| d.contacts.as_mut()) {
                    k.link = name;
                }
            } else if let Some(m) = c.meters.iter_mut().find(|m| m.id == id) {
                m.link = name;
            } else if let Some(i) = c.inverters.iter_mut().find(|i| i.id == id) {
                i.link = name;
            }
        }
        c
    }
}

impl Drop for SimSite {
    fn drop(&mut self) {
        self.ticker.abort();
        for bus in &self.buses {
            bus.abort();
        }
        for d in lock(&self.world).devices.iter_mut() {
            if let Some(stop) = d.stop.take() {
                let _ = stop.send(());
            }
        }
    }
}

struct SimClock(Arc<Mutex<World>>);

impl Clock for SimClock {
    fn now(&self) -> chrono::DateTime<chrono::Utc> {
        let mut w = lock(&self.0);
        catch_up(&mut w);
        w.model.now
    }
    fn monotonic(&self) -> Duration {
        let mut w = lock(&self.0);
        catch_up(&mut w);
        (w.model.now - w.started).to_std().unwrap_or_default()
    }
}

/// While time runs with the wall clock, step the physics up to the wall clock's time, so a
/// write lands on the site as it is when the write arrives.
fn catch_up(w: &mut World) {
    let Some((since, from)) = w.real_time_since else {
        return;
    };
    let target = from + chrono::Duration::from_std(since.elapsed()).unwrap_or_default();
    let tick = TICK.as_secs_f64();
    loop {
        let left = (target - w.model.now).num_microseconds().unwrap_or(0) as f64 / 1e6;
        // Sub-millisecond steps change nothing a test can see.
        if left < 1e-3 {
            return;
        }
        w.model.step(left.min(tick));
    }
}

async fn tick(world: Arc<Mutex<World>>) {
    let mut interval = tokio::time::interval(TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let mut w = lock(&world);
        if !w.paused {
            let dt = TICK.as_secs_f64() * w.time_factor;
            w.model.step(dt);
        }
    }
}

async fn serve(world: &Arc<Mutex<World>>, index: usize, addr: SocketAddr) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    {
        let mut w = lock(world);
        w.devices[index].addr = bound;
        w.devices[index].stop = Some(stop_tx);
    }
    let world = world.clone();
    tokio::spawn(async move {
        let server = Server::new(listener);
        let new_service = move |_socket_addr| {
            Ok(Some(DeviceService {
                world: world.clone(),
                index,
            }))
        };
        let on_connected = |stream, socket_addr| {
            let new_service = new_service.clone();
            async move { accept_tcp_connection(stream, socket_addr, new_service) }
        };
        let on_process_error = |err| tracing::debug!("simulated device connection ended: {err}");
        let stop = async move {
            let _ = stop_rx.await;
        };
        if let Err(e) = server
            .serve_until(&on_connected, on_process_error, stop)
            .await
        {
            tracing::warn!("simulated device server stopped: {e}");
        }
    });
    Ok(())
}

#[derive(Clone)]
struct DeviceService {
    world: Arc<Mutex<World>>,
    index: usize,
}

type Reply = Pin<Box<dyn Future<Output = Result<Response, ExceptionCode>> + Send>>;

impl tokio_modbus::server::Service for DeviceService {
    type Request = SlaveRequest<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = Reply;

    fn call(&self, req: Self::Request) -> Self::Future {
        let result = {
            let mut w = lock(&self.world);
            let w = &mut *w;
            let dev = &w.devices[self.index];
            // TCP slaves commonly ignore the unit id; answer 0 and 255 as well as our own.
            if req.slave != dev.unit && req.slave != 0 && req.slave != 255 {
                Err(ExceptionCode::GatewayTargetDevice)
            } else {
                match dev.behaviour {
                    Behaviour::Silent => return Box::pin(std::future::pending()),
                    Behaviour::Exception(code) => Err(ExceptionCode::new(code)),
                    Behaviour::Normal | Behaviour::Garbage | Behaviour::Frozen => {
                        let garbage = dev.behaviour == Behaviour::Garbage;
                        respond(w, self.index, req.request, garbage)
                    }
                }
            }
        };
        Box::pin(std::future::ready(result))
    }
}

/// A device's answer to a request, with every write it receives logged.
pub(crate) fn respond(
    w: &mut World,
    index: usize,
    request: Request<'static>,
    garbage: bool,
) -> Result<Response, ExceptionCode> {
    let written: Vec<(u16, u16)> = match &request {
        Request::WriteSingleRegister(a, v) => vec![(*a, *v)],
        Request::WriteMultipleRegisters(a, vs) => vs
            .iter()
            .enumerate()
            .map(|(k, v)| (a.wrapping_add(k as u16), *v))
            .collect(),
        _ => Vec::new(),
    };
    catch_up(w);
    let dev = &w.devices[index];
    let (kind, unit, id) = (dev.kind, dev.unit, dev.id.clone());
    let read = matches!(
        request,
        Request::ReadHoldingRegisters(..) | Request::ReadInputRegisters(..)
    );
    if let (
        Kind::Meter {
            role: MeterRole::Grid,
            ..
        },
        true,
        false,
    ) = (kind, read, garbage)
    {
        // One reading per poll: the slow reads that follow the power block in the same
        // poll (energy, frequency) show the same instant.
        let now = w.model.now;
        let new_poll = w
            .grid_reads
            .last()
            .is_none_or(|(t, _)| (now - *t).num_milliseconds() >= 100);
        if new_poll && w.grid_reads.len() < 1_000_000 && dev.frozen.is_none() {
            let at = (now, w.model.truth.grid_w);
            w.grid_reads.push(at);
        }
    }
    let dev = &w.devices[index];
    let frozen = dev.frozen.clone();
    let result = match (kind, &request) {
        (Kind::Contacts, Request::ReadDiscreteInputs(start, count)) => {
            let bits: Option<Vec<bool>> = (0..*count)
                .map(|k| dev.inputs.get(usize::from(start.wrapping_add(k))).copied())
                .collect();
            bits.map(Response::ReadDiscreteInputs)
                .ok_or(ExceptionCode::IllegalDataAddress)
        }
        (Kind::Contacts, _) => Err(ExceptionCode::IllegalFunction),
        _ => handle(&mut w.model, kind, unit, request, garbage, frozen),
    };
    for (addr, value) in written {
        w.writes.push(WriteRecord {
            device: id.clone(),
            addr,
            value,
            accepted: result.is_ok(),
        });
    }
    result
}

/// A device's registers as the physics has them now.
fn image(model: &SiteModel, kind: Kind, unit: u8) -> registers::Image {
    match kind {
        Kind::Inverter(i) => registers::inverter_image(model, &model.inverters[i], i),
        Kind::Meter { model: mm, role } => registers::meter_image(model, mm, role, unit),
        Kind::Contacts => registers::Image::default(),
    }
}

fn handle(
    model: &mut SiteModel,
    kind: Kind,
    unit: u8,
    request: Request<'static>,
    garbage: bool,
    frozen: Option<registers::Image>,
) -> Result<Response, ExceptionCode> {
    let image = || frozen.clone().unwrap_or_else(|| image(model, kind, unit));
    let read = |start: u16, count: u16| {
        let words = image().read(start, count)?;
        Ok(if garbage {
            vec![0xFFFF; words.len()]
        } else {
            words
        })
    };
    match request {
        Request::ReadHoldingRegisters(start, count) => {
            read(start, count).map(Response::ReadHoldingRegisters)
        }
        Request::ReadInputRegisters(start, count) => match kind {
            // SAJ inverters have no input registers; the Chint meters answer FC04 too.
            Kind::Inverter(_) | Kind::Contacts => Err(ExceptionCode::IllegalFunction),
            Kind::Meter { .. } => read(start, count).map(Response::ReadInputRegisters),
        },
        Request::WriteSingleRegister(addr, value) => match kind {
            Kind::Inverter(i) => {
                let now = model.now;
                registers::write_inverter_setting(&mut model.inverters[i], addr, value, now)?;
                Ok(Response::WriteSingleRegister(addr, value))
            }
            Kind::Meter { .. } | Kind::Contacts => Err(ExceptionCode::IllegalDataAddress),
        },
        Request::WriteMultipleRegisters(addr, values) => match kind {
            Kind::Inverter(i) => {
                // All or nothing: check every value before applying any.
                let now = model.now;
                let inv = &mut model.inverters[i];
                let mut staged = inv.clone();
                for (k, v) in values.iter().enumerate() {
                    let a = addr
                        .checked_add(k as u16)
                        .ok_or(ExceptionCode::IllegalDataAddress)?;
                    registers::write_inverter_setting(&mut staged, a, *v, now)?;
                }
                *inv = staged;
                Ok(Response::WriteMultipleRegisters(addr, values.len() as u16))
            }
            Kind::Meter { .. } | Kind::Contacts => Err(ExceptionCode::IllegalDataAddress),
        },
        _ => Err(ExceptionCode::IllegalFunction),
    }
}
