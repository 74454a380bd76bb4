//! The machine's recovery hook (DESIGN §7): a command template the operator gave at protect
//! time, run by the configuration server after the disks of a test failover or failover are
//! ready. The template is split like a shell would (quotes work) but no shell runs it; in
//! each word `{machine}`, `{mode}` (test or failover), `{point}` (the point's id: `latest` for
//! the newest applied position), `{point_time}` (when that point was captured, RFC 3339),
//! `{network}` and `{disks}` are
//! replaced — a word that is exactly `{disks}` becomes one argument per disk URI, elsewhere
//! the URIs are joined with commas. The same values are in the environment as
//! `LIFEBOAT_MACHINE`, `LIFEBOAT_MODE`, `LIFEBOAT_POINT`, `LIFEBOAT_POINT_TIME`,
//! `LIFEBOAT_NETWORK` and `LIFEBOAT_DISKS` (space-separated). Its output is kept in the job.
use std::time::Duration;
use tokio::process::Command;

/// Longest a hook may run.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(600);
/// Output kept in the job (the end of it, where errors are).
const KEEP_OUTPUT: usize = 16 * 1024;

pub struct HookInput<'a> {
    pub machine: &'a str,
    pub mode: &'a str,
    pub point: &'a str,
    pub point_time: &'a str,
    pub network: &'a str,
    pub disks: &'a [String],
}

/// The argument vector the template expands to.
pub fn expand(template: &str, input: &HookInput<'_>) -> Result<Vec<String>, String> {
    let words =
        shlex::split(template).ok_or_else(|| format!("{template:?} has unbalanced quotes"))?;
    if words.is_empty() {
        return Err("the command is empty".into());
    }
    let mut args = Vec::new();
    for word in words {
        if word == "{disks}" {
            args.extend(input.disks.iter().cloned());
            continue;
        }
        args.push(
            word.replace("{machine}", input.machine)
                .replace("{mode}", input.mode)
                .replace("{point}", input.point)
                .replace("{point_time}", input.point_time)
                .replace("{network}", input.network)
                .replace("{disks}", &input.disks.join(",")),
        );
    }
    Ok(args)
}

/// Runs the hook (or a plan's script: `what` names it in errors); returns its output, or an
/// error holding it.
pub async fn run(what: &str, template: &str, input: &HookInput<'_>) -> Result<String, String> {
    let args = expand(template, input).map_err(|e| format!("the {what}: {e}"))?;
    let mut command = Command::new(&args[0]);
    command
        .args(&args[1..])
        .env("LIFEBOAT_MACHINE", input.machine)
        .env("LIFEBOAT_MODE", input.mode)
        .env("LIFEBOAT_POINT", input.point)
        .env("LIFEBOAT_POINT_TIME", input.point_time)
        .env("LIFEBOAT_NETWORK", input.network)
        .env("LIFEBOAT_DISKS", input.disks.join(" "))
        .kill_on_drop(true);
    let out = match tokio::time::timeout(HOOK_TIMEOUT, command.output()).await {
        Err(_) => {
            return Err(format!(
                "the {what} ran longer than {HOOK_TIMEOUT:?} and was killed"
            ))
        }
        Ok(Err(e)) => return Err(format!("cannot run the {what} {:?}: {e}", args[0])),
        Ok(Ok(out)) => out,
    };
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    if text.len() > KEEP_OUTPUT {
        let cut = text.len() - KEEP_OUTPUT;
        let cut = (cut..text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(cut);
        text = format!("…{}", &text[cut..]);
    }
    let text = format!(
        "$ {}\n{}",
        shlex::try_join(args.iter().map(String::as_str)).unwrap_or_default(),
        text.trim_end()
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("the {what} failed ({}):\n{text}", out.status))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_expand_per_word() {
        let disks = vec!["nbd://h:1/a".to_string(), "nbd://h:1/b".to_string()];
        let input = HookInput {
            machine: "db01",
            mode: "test",
            point: "app:1",
            point_time: "2026-12-06T08:00:00.000Z",
            network: "lan=test-lan",
            disks: &disks,
        };
        let args = expand(
            "boot --name '{machine} vm' {disks} --all={disks} -n {network} --at {point_time}",
            &input,
        )
        .unwrap();
        assert_eq!(
            args,
            vec![
                "boot",
                "--name",
                "db01 vm",
                "nbd://h:1/a",
                "nbd://h:1/b",
                "--all=nbd://h:1/a,nbd://h:1/b",
                "-n",
                "lan=test-lan",
                "--at",
                "2026-12-06T08:00:00.000Z"
            ]
        );
        assert!(expand("boot 'unbalanced", &input).is_err());
    }
}
