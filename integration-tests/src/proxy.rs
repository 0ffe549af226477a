//! A TCP proxy between a process under test and one server of the shared stack, switchable
//! at run time between forwarding, hanging and delaying, so a test can make PostgreSQL or
//! Redis unreachable *for its own processes only*, without touching the shared servers.
//!
//! `Hang` is a server that holds its connections and never answers (the worst case for a
//! client: nothing fails, everything waits); `Refuse` drops every connection at once, as a
//! stopped server does; `Delay(d)` holds each chunk the server sends for `d` (a slow server).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Forward,
    Hang,
    Refuse,
    /// Server-to-client bytes wait this long before they are passed on.
    Delay(Duration),
}

pub struct FaultProxy {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on 127.0.0.1 (port 0) and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (mode, watcher) = watch::channel(Mode::Forward);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(serve(client, upstream, watcher.clone()));
            }
        });
        Ok(FaultProxy { addr, mode, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// `url` (scheme://[user@]host:port/rest) with its host and port replaced by the proxy's.
    pub fn url_for(&self, url: &str) -> anyhow::Result<String> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| anyhow::anyhow!("no scheme in {url}"))?;
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let user = authority.rsplit_once('@').map(|(user, _)| format!("{user}@"));
        Ok(format!(
            "{scheme}://{}{}/{path}",
            user.unwrap_or_default(),
            self.addr
        ))
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The `host:port` of a `scheme://[user@]host:port/...` URL.
pub fn url_addr(url: &str) -> anyhow::Result<SocketAddr> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or(rest);
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
    Ok(host_port.parse()?)
}

async fn serve(client: TcpStream, upstream: SocketAddr, mut mode: watch::Receiver<Mode>) {
    let current = *mode.borrow_and_update();
    match current {
        Mode::Refuse => return,
        Mode::Hang => {
            // Accepted and never answered: hold the socket until the mode changes, then drop it.
            let _held = client;
            let _ = mode.changed().await;
            return;
        }
        Mode::Forward | Mode::Delay(_) => {}
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::select! {
        _ = pump(client_read, server_write, mode.clone(), false) => {}
        _ = pump(server_read, client_write, mode, true) => {}
    }
}

/// Copies chunks from `from` to `to` as the mode says; returns when either side closes or
/// the mode is `Refuse`.
async fn pump(
    mut from: impl AsyncReadExt + Unpin,
    mut to: impl AsyncWriteExt + Unpin,
    mut mode: watch::Receiver<Mode>,
    from_server: bool,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            read = from.read(&mut buffer) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            // A connection already open is cut as soon as the server "stops".
            _ = wait_for(&mut mode, |m| m == Mode::Refuse) => return,
        };
        loop {
            let current = *mode.borrow_and_update();
            match current {
                Mode::Forward => break,
                Mode::Refuse => return,
                Mode::Delay(delay) if from_server => {
                    tokio::time::sleep(delay).await;
                    break;
                }
                Mode::Delay(_) => break,
                Mode::Hang => {
                    if mode.changed().await.is_err() {
                        return;
                    }
                }
            }
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

async fn wait_for(mode: &mut watch::Receiver<Mode>, f: impl Fn(Mode) -> bool) {
    if mode.wait_for(|m| f(*m)).await.is_err() {
        std::future::pending::<()>().await;
    }
}
