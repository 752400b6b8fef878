//! Simulated RS485 buses: every device of one RTU link answers as a Modbus RTU slave on one
//! serial device, as on real wiring. Each transaction takes its wire time at the bus's baud
//! rate, so timing measured against the simulator means something.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio_modbus::server::rtu::Server;
use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};
use tokio_serial::{SerialPortBuilderExt, SerialStream};

use super::{lock, respond, Behaviour, World};
use crate::io::link::{inter_frame_gap, rtu_frame_bytes, Frame};

/// How long after the request starts the answer is complete: both frames at 11 bits a
/// character and the silence that ends the request. The silence after the answer is the
/// master's to keep.
fn answer_delay(baud: u32, request_bytes: usize, response_bytes: usize) -> std::time::Duration {
    let chars = (request_bytes + response_bytes) as f64 * 11.0 / f64::from(baud.max(1));
    std::time::Duration::from_secs_f64(chars) + inter_frame_gap(baud)
}

/// Open the slave end of a bus, shared, so a device can also put a corrupt frame on it.
pub(super) fn open(path: &Path, baud: u32) -> std::io::Result<SerialStream> {
    let mut port = tokio_serial::new(path.to_string_lossy(), baud)
        .open_native_async()
        .map_err(std::io::Error::other)?;
    port.set_exclusive(false).map_err(std::io::Error::other)?;
    Ok(port)
}

/// Serve the bus until the task is aborted; garbage from the master ends one serving run and
/// the port is opened again, as a real slave resynchronises.
pub(super) async fn serve(
    world: Arc<Mutex<World>>,
    link: String,
    path: PathBuf,
    baud: u32,
    first: SerialStream,
) {
    let mut port = Some(first);
    loop {
        let serial = match port.take() {
            Some(p) => p,
            None => match open(&path, baud) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(
                        "simulated bus {link}: cannot reopen {}: {e}",
                        path.display()
                    );
                    return;
                }
            },
        };
        let service = BusService {
            world: world.clone(),
            link: link.clone(),
            path: path.clone(),
            baud,
        };
        if let Err(e) = Server::new(serial).serve_forever(service).await {
            tracing::debug!("simulated bus {link}: {e}; resynchronising");
        }
    }
}

struct BusService {
    world: Arc<Mutex<World>>,
    link: String,
    path: PathBuf,
    baud: u32,
}

enum Answer {
    /// Nobody at that address, or the device does not answer.
    Nothing,
    Reply(Result<Response, ExceptionCode>),
    /// The answer, sent with a broken CRC.
    Corrupt(Response),
}

fn request_frame(req: &Request<'_>) -> Frame {
    match req {
        Request::ReadHoldingRegisters(_, n) | Request::ReadInputRegisters(_, n) => Frame::Read(*n),
        Request::ReadDiscreteInputs(_, n) | Request::ReadCoils(_, n) => Frame::ReadBits(*n),
        Request::WriteMultipleRegisters(_, v) => Frame::WriteMultiple(v.len() as u16),
        _ => Frame::WriteSingle,
    }
}

/// CRC-16/MODBUS.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc = 0xFFFFu16;
    for &b in bytes {
        crc ^= u16::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xA001
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// The RTU frame of a read response, with its CRC inverted.
fn corrupt_frame(slave: u8, response: &Response) -> Vec<u8> {
    let (fc, words) = match response {
        Response::ReadHoldingRegisters(w) => (0x03, w.as_slice()),
        Response::ReadInputRegisters(w) => (0x04, w.as_slice()),
        _ => (0x06, &[][..]),
    };
    let mut frame = vec![slave, fc, (words.len() * 2) as u8];
    for w in words {
        frame.extend_from_slice(&w.to_be_bytes());
    }
    let crc = !crc16(&frame);
    frame.extend_from_slice(&crc.to_le_bytes());
    frame
}

impl tokio_modbus::server::Service for BusService {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Option<Response>, ExceptionCode>> + Send>,
    >;

    fn call(&self, req: Self::Request) -> Self::Future {
        let frame = request_frame(&req.request);
        let answer = {
            let mut w = lock(&self.world);
            let index = w
                .devices
                .iter()
                .position(|d| d.rtu && d.link == self.link && d.unit == req.slave);
            match index {
                None => Answer::Nothing,
                Some(i) if w.devices[i].unplugged => Answer::Nothing,
                Some(i) => match w.devices[i].behaviour {
                    Behaviour::Silent => Answer::Nothing,
                    Behaviour::Exception(code) => Answer::Reply(Err(ExceptionCode::new(code))),
                    Behaviour::Garbage => match respond(&mut w, i, req.request, false) {
                        Ok(r) => Answer::Corrupt(r),
                        Err(e) => Answer::Reply(Err(e)),
                    },
                    Behaviour::Normal | Behaviour::Frozen => {
                        Answer::Reply(respond(&mut w, i, req.request, false))
                    }
                },
            }
        };
        let baud = self.baud;
        let path = self.path.clone();
        let slave = req.slave;
        Box::pin(async move {
            let (request_bytes, response_bytes) =
                rtu_frame_bytes(frame, matches!(answer, Answer::Reply(Err(_))));
            match answer {
                Answer::Nothing => {
                    tokio::time::sleep(answer_delay(baud, request_bytes, 0)).await;
                    Ok(None)
                }
                Answer::Reply(r) => {
                    tokio::time::sleep(answer_delay(baud, request_bytes, response_bytes)).await;
                    r.map(Some)
                }
                Answer::Corrupt(r) => {
                    tokio::time::sleep(answer_delay(baud, request_bytes, response_bytes)).await;
                    let bytes = corrupt_frame(slave, &r);
                    if let Err(e) = std::fs::OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .and_then(|mut f| f.write_all(&bytes))
                    {
                        tracing::warn!("simulated bus: could not write a corrupt frame: {e}");
                    }
                    Ok(None)
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_matches_the_modbus_reference_frame() {
        // Read holding registers, slave 1, address 0, count 1: 01 03 00 00 00 01 84 0A.
        let crc = crc16(&[0x01, 0x03, 0x00, 0x00, 0x00, 0x01]);
        assert_eq!(crc.to_le_bytes(), [0x84, 0x0A]);
    }
}
