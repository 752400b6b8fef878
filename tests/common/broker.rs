//! A real mosquitto on a free loopback port, stopped when dropped.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Mosquitto {
    child: Child,
    config: std::path::PathBuf,
    pub port: u16,
    pub dir_path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    pub fn start() -> Mosquitto {
        Mosquitto::with_config(|_| "allow_anonymous true\n".into())
    }

    /// A broker whose configuration after its listener line is `rest(dir)`: `dir` is the
    /// broker's own temporary directory, for password files and certificates.
    pub fn with_config(rest: impl FnOnce(&std::path::Path) -> String) -> Mosquitto {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = dir.path().join("mosquitto.conf");
        std::fs::write(
            &config,
            format!(
                "listener {port} 127.0.0.1\npersistence false\n{}",
                rest(dir.path())
            ),
        )
        .unwrap();
        let child = Self::spawn(&config);
        let m = Mosquitto {
            child,
            config,
            port,
            dir_path: dir.path().to_path_buf(),
            _dir: dir,
        };
        m.wait_listening();
        m
    }

    fn spawn(config: &std::path::Path) -> Child {
        Command::new("mosquitto")
            .arg("-c")
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto is installed (.ci/run installs it: apt-get install mosquitto)")
    }

    fn wait_listening(&self) {
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("mosquitto did not listen on {}", self.port);
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn restart(&mut self) {
        self.child = Self::spawn(&self.config);
        self.wait_listening();
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A broker link that can be cut from outside: a TCP proxy between one client and the
/// broker. `cut` drops its connections and refuses new ones (the broker is down, as the
/// client sees it) while other clients stay connected; `restore` lets it through again.
pub struct LinkCut {
    pub port: u16,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl LinkCut {
    /// Forward a free loopback port to the broker on `target_port`. Call within Tokio.
    pub fn start(target_port: u16) -> LinkCut {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("proxy addr").port();
        let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
        let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (o, c) = (open.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !o.load(Ordering::SeqCst) {
                    continue;
                }
                let Ok(mut upstream) =
                    tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await
                else {
                    continue;
                };
                let forward = tokio::spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                });
                c.lock().unwrap().push(forward);
            }
        });
        LinkCut {
            port,
            open,
            conns,
            accept,
        }
    }

    pub fn cut(&self) {
        self.open.store(false, std::sync::atomic::Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    pub fn restore(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for LinkCut {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// An aggregator's client on the broker at `port`: subscribed to `topics` (at least once)
/// before this returns, every message it hears passed on as (topic, JSON).
pub async fn aggregator(
    port: u16,
    id: &str,
    topics: &[&str],
) -> (
    rumqttc::AsyncClient,
    tokio::sync::mpsc::UnboundedReceiver<(String, serde_json::Value)>,
) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(o, 64);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (subscribed_tx, mut subscribed) = tokio::sync::mpsc::unbounded_channel();
    let sub = client.clone();
    let topics: Vec<String> = topics.iter().map(|t| t.to_string()).collect();
    let wanted = topics.len();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    for t in &topics {
                        let _ = sub.subscribe(t, QoS::AtLeastOnce).await;
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = subscribed_tx.send(());
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let v = serde_json::from_slice(&p.payload).unwrap_or(serde_json::Value::Null);
                    if tx.send((p.topic, v)).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    for _ in 0..wanted {
        tokio::time::timeout(Duration::from_secs(10), subscribed.recv())
            .await
            .expect("the aggregator subscribed");
    }
    (client, rx)
}
