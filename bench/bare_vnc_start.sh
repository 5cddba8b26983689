#!/usr/bin/env bash
# The bare path bench/vnc_start.py compares `isession start vnc --target compute` with: the same steps by hand.
# Runs as the workspace user on the workspace.
#   bare_vnc_start.sh ID WSPORT WORKDIR CONTROLLER(user@host) WORKSPACE(user@host) JOB_SCRIPT
# 1. a token in a 0600 file; 2. ONE ssh to the controller that makes the job directory, stores the token (first line
# of stdin, never argv) and submits JOB_SCRIPT (the rest of stdin) with sbatch; 3. the job (bare_vnc_job.sh) starts
# Xvnc, xfce4, websockify and `ssh -R` back; 4. poll noVNC's page every 0.2 s until it answers 2xx/3xx/401/403.
# Prints "begin T", "submitted T JOBID", "ready T CODE" (epoch seconds) on stdout.
set -eu
id=$1 wsport=$2 work=$3 ctrl=$4 ws=$5 job_script=$6
now() { date +%s.%N; }
echo "begin $(now)"
umask 077
python3 -c 'import secrets; print(secrets.token_urlsafe(32))' >"$work/secret"
# shellcheck disable=SC2016  # expanded on the controller
remote='umask 077; d="$HOME/.bench-bare/'"$id"'"; mkdir -p "$d" && cd "$d" && IFS= read -r s && printf "%s\n" "$s" >secret && unset s && exec sbatch --parsable -J bare-'"$id"' -o job.out --export=ALL,BARE_WSPORT='"$wsport"',BARE_WS='"$ws"
job=$(cat "$work/secret" "$job_script" | ssh -o BatchMode=yes "$ctrl" "$remote")
echo "submitted $(now) $job"
url="http://127.0.0.1:$wsport/me/$wsport/vnc.html"
deadline=$((SECONDS + ${BARE_TIMEOUT:-120}))
while :; do
  code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$url" || true)
  case "$code" in 2??|3??|401|403) break ;; esac
  if [ "$SECONDS" -ge "$deadline" ]; then echo "timeout $(now) $code"; exit 1; fi
  sleep 0.2
done
echo "ready $(now) $code"
