//! What closing idle connections (`sentinel serve --idle-timeout`) costs per request: one
//! kept-alive loopback connection answering a trivial route, served by `sentinel_server::serve`
//! with the idle watch (`watch`) or without it (`off`: its per-request bookkeeping still runs), or
//! by hyper alone, with its own header-read timer (`hyper`, the alternative that `serve` does not
//! use) or without any (`plain`, the baseline). Count it with callgrind, whose
//! instruction counts do not depend on the machine's load:
//!
//! `valgrind --tool=callgrind --callgrind-out-file=/dev/null target/release/examples/conn_cost watch 20000`
//! and the same with `off`, `hyper` and `plain`; the difference divided by the requests is the cost per
//! request. It prints the wall-clock time per request too, for a rough look without valgrind.

use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "watch".into());
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let router = Router::new().route("/", get(|| async { "ok" }));
    let idle = Duration::from_secs(30);
    // The server always has timers pending (its flushers' intervals), so tokio's timer wheel is
    // consulted at every park whatever the mode; here too.
    tokio::spawn(async {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
        }
    });
    match mode.as_str() {
        "watch" | "off" => {
            let idle = (mode == "watch").then_some(idle);
            tokio::spawn(sentinel_server::serve(
                listener,
                router,
                idle,
                idle.unwrap_or_default(),
                std::future::pending(),
            ));
        }
        "hyper" | "plain" => {
            let timer = mode == "hyper";
            tokio::spawn(async move {
                let (tcp, _) = listener.accept().await?;
                tcp.set_nodelay(true)?;
                let mut http = hyper::server::conn::http1::Builder::new();
                if timer {
                    http.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(idle);
                }
                let service = hyper_util::service::TowerToHyperService::new(router);
                http.serve_connection(hyper_util::rt::TokioIo::new(tcp), service).await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            });
        }
        other => return Err(format!("mode `{other}`: expected watch, off, hyper or plain").into()),
    }
    let mut client = tokio::net::TcpStream::connect(addr).await?;
    client.set_nodelay(true)?;
    let request = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let mut buf = vec![0u8; 4096];
    let started = Instant::now();
    for _ in 0..n {
        client.write_all(request).await?;
        // The answer is small and ends with its two-byte body.
        let mut got = 0;
        while !buf.get(..got).is_some_and(|b| b.ends_with(b"\r\n\r\nok")) {
            let read = client.read(buf.get_mut(got..).ok_or("answer too long")?).await?;
            if read == 0 {
                return Err("the server closed the connection".into());
            }
            got += read;
        }
    }
    let took = started.elapsed();
    println!("{n} requests ({mode}): {:.2} µs each (wall clock)", took.as_secs_f64() * 1e6 / n as f64);
    Ok(())
}
