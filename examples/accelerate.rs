//! Runs a command in a fresh child cgroup with the accelerator attached to
//! it (or, with `--plain`, without), then prints the counters.
//!
//! ```text
//! accelerate [--plain] [--port P]... [--comm NAME]... [--stats-file F]
//!            [--require-splice-guard] [--accelerate-blocking] [--demote-streaming]
//!            -- CMD [ARGS...]
//! ```
//! `--accelerate-blocking` sets `BlockingSockets::Accelerate` (connections
//! from sockets blocking at connect() are accelerated too; see its docs);
//! `--demote-streaming` attaches with
//! `demote_streaming(StreamingDemotion::default())`.
//! Without `--require-splice-guard`, a kernel that refuses the splice guard
//! gets the accelerator without it (said on stderr); with it, that fails.
//! Every process the command starts inherits the cgroup, so servers and
//! clients started by it are in scope. The cgroup is removed on exit; the
//! exit code is the command's. Used by `scripts/real-programs.sh`.

use std::process::{exit, Command};

use sockmap_fastpath::{Accelerator, BlockingSockets, Cgroup, StreamingDemotion};
use support::{attach, report, signals};

fn main() {
    if let Err(err) = run() {
        report::print_error("accelerate", err.as_ref());
        exit(2);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let split = args
        .iter()
        .position(|a| a == "--")
        .ok_or("usage: accelerate [options] -- CMD [ARGS...]")?;
    let (options, command) = (&args[..split], &args[split + 1..]);
    if command.is_empty() {
        return Err("no command after --".into());
    }
    let value = |i: usize| {
        options
            .get(i + 1)
            .cloned()
            .ok_or_else(|| format!("{} needs a value", options[i]))
    };
    let (mut plain, mut ports, mut comms, mut stats_file) = (false, Vec::new(), Vec::new(), None);
    let (mut require_guard, mut blocking) = (false, BlockingSockets::KeepPlain);
    let mut demote = false;
    let mut i = 0;
    while i < options.len() {
        match options[i].as_str() {
            "--plain" => plain = true,
            "--require-splice-guard" => require_guard = true,
            "--accelerate-blocking" => blocking = BlockingSockets::Accelerate,
            "--demote-streaming" => demote = true,
            "--port" => {
                ports.push(value(i)?.parse::<u16>()?);
                i += 1;
            }
            "--comm" => {
                comms.push(value(i)?);
                i += 1;
            }
            "--stats-file" => {
                stats_file = Some(value(i)?);
                i += 1;
            }
            other => return Err(format!("unknown option {other}").into()),
        }
        i += 1;
    }

    let parent = Cgroup::current()?;
    let cgroup = parent.create_child(&format!("sockmap-fastpath-run-{}", std::process::id()))?;
    signals::remove_cgroup_on_signal(parent.clone(), cgroup.as_path().to_owned());
    let guard = if plain {
        None
    } else {
        let mut builder = Accelerator::builder()
            .cgroup(cgroup.cgroup().clone())
            .ports(ports)
            .blocking_sockets(blocking);
        for comm in comms {
            builder = builder.comm(comm);
        }
        if demote {
            builder = builder.demote_streaming(StreamingDemotion::default());
        }
        Some(if require_guard {
            builder.attach()?
        } else {
            attach::attach_or_without_splice_guard(builder, "accelerate")?
        })
    };
    cgroup.add_process(std::process::id())?;
    let mut child = Command::new(&command[0]);
    child.args(&command[1..]);
    signals::unblock_in_child(&mut child);
    let status = child.status()?;
    let stats = guard
        .as_ref()
        .map(|g| g.stats())
        .transpose()?
        .unwrap_or_default();
    let line: Vec<String> = stats
        .counters()
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let text = format!("{}\n", line.join(" "));
    match stats_file {
        Some(path) => std::fs::write(path, text)?,
        None => eprint!("accelerate: {text}"),
    }
    drop(guard);
    drop(cgroup);
    exit(status.code().unwrap_or(1));
}
