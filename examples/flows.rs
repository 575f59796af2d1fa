//! Watch an agent's flow events, like `hubble observe`.
//!
//! ```text
//! flows [--socket PATH] [--from ID] [--to ID] [--identity ID]
//!       [--verdict forwarded|dropped|audit|redirected] [--port N]
//!       [--json] [--count N]
//! ```
//!
//! Connects to the Unix socket of an agent started with `--flow-socket`
//! (default /run/meshpath/flows.sock), reads its length-delimited protobuf
//! `meshpath.flow.Flow` messages, and prints the ones that match, one
//! line each: the agent's `--flows` line, or with `--json` its
//! `--flows=json` line. It sees flows from the moment it connects.
//!
//! Filters: an ID is a SPIFFE ID (matched against the endpoint's
//! `spiffe=` label), `host`, `world`, or an identity number. `--from`
//! matches the source, `--to` the destination, `--identity` either;
//! `--port` either port; `--verdict` the protobuf verdict. A filter given
//! more than once matches any of its values; different filters must all
//! match.
//!
//! Runs until the agent closes the stream (exit 0), SIGINT, or `--count`
//! matching flows were printed (exit 0). Errors (no socket, no agent
//! behind it, a broken message, the agent gone before `--count` flows)
//! are one line on stderr (`flows: error: ...`) and exit status 1.

#[path = "agent/flowfmt.rs"]
mod flowfmt;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::error::ErrorKind;
use clap::{ColorChoice, Parser};
use meshpath::events::proto;
use prost::Message;

/// The largest message accepted (a flow is about 200 bytes).
const MAX_MESSAGE: u64 = 1 << 20;

#[derive(Debug, Parser)]
#[command(
    name = "flows",
    version,
    about = "Print the flow events a meshpath agent serves on its --flow-socket",
    long_about = None,
    color = ColorChoice::Never
)]
struct Args {
    /// The agent's flow socket.
    #[arg(long, value_name = "PATH", default_value = "/run/meshpath/flows.sock")]
    socket: PathBuf,

    /// Only flows from this identity: a SPIFFE ID, host, world or a
    /// number (repeatable: any of them).
    #[arg(long, value_name = "ID")]
    from: Vec<String>,

    /// Only flows to this identity (repeatable).
    #[arg(long, value_name = "ID")]
    to: Vec<String>,

    /// Only flows from or to this identity (repeatable).
    #[arg(long, value_name = "ID")]
    identity: Vec<String>,

    /// Only flows with this verdict: forwarded, dropped, audit or
    /// redirected (repeatable).
    #[arg(long, value_name = "VERDICT", value_parser = parse_verdict)]
    verdict: Vec<proto::Verdict>,

    /// Only flows from or to this port (repeatable).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    port: Vec<u16>,

    /// Print JSON lines (the agent's --flows=json) instead of text.
    #[arg(long)]
    json: bool,

    /// Exit after printing N matching flows.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    count: Option<u64>,
}

fn parse_verdict(s: &str) -> Result<proto::Verdict, String> {
    match s.to_ascii_lowercase().as_str() {
        "forwarded" => Ok(proto::Verdict::Forwarded),
        "dropped" => Ok(proto::Verdict::Dropped),
        "audit" => Ok(proto::Verdict::Audit),
        "redirected" => Ok(proto::Verdict::Redirected),
        _ => Err(format!(
            "{s:?} is not one of forwarded, dropped, audit, redirected"
        )),
    }
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            print!("{}", e.render());
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let text = e.render().to_string();
            let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
            let first = first.trim().strip_prefix("error: ").unwrap_or(first.trim());
            eprintln!("flows: error: {first}; see flows --help");
            return ExitCode::from(1);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("flows: error: {}", msg.join(": ").replace('\n', " "));
            ExitCode::from(1)
        }
    }
}

fn run(args: &Args) -> anyhow::Result<()> {
    let path = &args.socket;
    let stream = UnixStream::connect(path).map_err(|e| {
        let why = match e.kind() {
            io::ErrorKind::NotFound => {
                "no such socket (is the agent running with --flow-socket?)".to_string()
            }
            io::ErrorKind::ConnectionRefused => {
                "nobody is serving it (the agent is gone)".to_string()
            }
            io::ErrorKind::PermissionDenied => "permission denied (run as root)".to_string(),
            _ => e.to_string(),
        };
        anyhow::anyhow!("cannot connect to {}: {why}", path.display())
    })?;
    let mut input = BufReader::with_capacity(64 * 1024, stream);
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    let mut printed = 0u64;
    loop {
        let flow = match read_flow(&mut input)? {
            Some(f) => f,
            None => {
                let _ = out.flush();
                if let Some(n) = args.count {
                    bail!("the agent closed the stream after {printed} of {n} matching flows");
                }
                return Ok(());
            }
        };
        if !matches(args, &flow) {
            continue;
        }
        let line = if args.json {
            flowfmt::json(&flow)
        } else {
            flowfmt::text(&flow)
        };
        let written = writeln!(out, "{line}");
        printed += 1;
        let done = args.count.is_some_and(|n| printed >= n);
        // Flush when nothing more is waiting, so that a reader of our
        // stdout sees each flow at once.
        let flushed = if done || input.buffer().is_empty() {
            out.flush()
        } else {
            Ok(())
        };
        if let Err(e) = written.and(flushed) {
            if e.kind() == io::ErrorKind::BrokenPipe {
                return Ok(()); // `flows | head`
            }
            return Err(e).context("writing to stdout");
        }
        if done {
            return Ok(());
        }
    }
}

/// The next message: a varint length, then that many bytes of
/// `meshpath.flow.Flow` (what prost's `encode_length_delimited` writes);
/// `None` at a clean end of stream.
fn read_flow(input: &mut BufReader<UnixStream>) -> anyhow::Result<Option<proto::Flow>> {
    // Most messages sit whole in the buffer: decode them in place.
    let buf = input.fill_buf().context("reading from the agent")?;
    if buf.is_empty() {
        return Ok(None);
    }
    if let Ok(len) = prost::decode_length_delimiter(buf) {
        let total = prost::length_delimiter_len(len) + len;
        if buf.len() >= total {
            let flow = proto::Flow::decode_length_delimited(&buf[..total])
                .context("a malformed message from the agent")?;
            input.consume(total);
            return Ok(Some(flow));
        }
    }
    // Split across reads: the length byte by byte, then the message.
    let mut len = 0u64;
    for i in 0..10 {
        let mut b = [0u8; 1];
        match input.read_exact(&mut b) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                bail!("the agent closed the stream in the middle of a message")
            }
            Err(e) => return Err(e).context("reading from the agent"),
        }
        len |= u64::from(b[0] & 0x7f) << (7 * i);
        if b[0] & 0x80 == 0 {
            break;
        }
        if i == 9 {
            bail!("a malformed message from the agent (bad length)");
        }
    }
    if len > MAX_MESSAGE {
        bail!("a malformed message from the agent ({len} bytes long)");
    }
    let mut body = vec![0u8; len as usize];
    input.read_exact(&mut body).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            anyhow::anyhow!("the agent closed the stream in the middle of a message")
        } else {
            anyhow::Error::new(e).context("reading from the agent")
        }
    })?;
    let flow = proto::Flow::decode(&body[..]).context("a malformed message from the agent")?;
    Ok(Some(flow))
}

fn matches(args: &Args, f: &proto::Flow) -> bool {
    let any = |ids: &[String], e: Option<&proto::Endpoint>| -> bool {
        ids.is_empty() || ids.iter().any(|id| endpoint_is(e, id))
    };
    let (src, dst) = (f.source.as_ref(), f.destination.as_ref());
    if !any(&args.from, src) || !any(&args.to, dst) {
        return false;
    }
    if !args.identity.is_empty()
        && !args
            .identity
            .iter()
            .any(|id| endpoint_is(src, id) || endpoint_is(dst, id))
    {
        return false;
    }
    if !args.verdict.is_empty() && !args.verdict.iter().any(|v| *v as i32 == f.verdict) {
        return false;
    }
    if !args.port.is_empty() {
        let ports = match f.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
            Some(proto::layer4::Protocol::Tcp(t)) => Some((t.source_port, t.destination_port)),
            Some(proto::layer4::Protocol::Udp(u)) => Some((u.source_port, u.destination_port)),
            _ => None,
        };
        let Some((sp, dp)) = ports else {
            return false;
        };
        if !args
            .port
            .iter()
            .any(|p| u32::from(*p) == sp || u32::from(*p) == dp)
        {
            return false;
        }
    }
    true
}

/// Whether endpoint `e` is `id`: its number, its SPIFFE ID (`spiffe=`
/// label), or `host`/`world` (`reserved:` label).
fn endpoint_is(e: Option<&proto::Endpoint>, id: &str) -> bool {
    let Some(e) = e else {
        return false;
    };
    if let Ok(n) = id.parse::<u64>() {
        return e.identity == n;
    }
    e.labels
        .iter()
        .any(|l| l.strip_prefix("spiffe=") == Some(id) || l.strip_prefix("reserved:") == Some(id))
}
