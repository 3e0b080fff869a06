#!/bin/sh
# K2's node-to-node pod network for kind (the role kindnetd plays in kind's own node images;
# kindnetd is not published as a Go module, so K2 cannot build it here). All kind nodes share
# one Docker network, so routing each node's podCIDR to that node's address is all it takes:
# this node's pods get a ptp/host-local CNI config for its own podCIDR, every other node's
# podCIDR gets a route via that node, and pod traffic leaving the pod network is masqueraded.
set -eu
SA=/var/run/secrets/kubernetes.io/serviceaccount
CONF=/etc/cni/net.d/10-kindnet.conflist

kube() {
  kubectl --server "https://${CONTROL_PLANE_ENDPOINT}" --certificate-authority "$SA/ca.crt" \
    --token "$(cat "$SA/token")" "$@"
}

write_conf() {
  cat > "$CONF.tmp" <<JSON
{
  "cniVersion": "0.3.1",
  "name": "kindnet",
  "plugins": [
    {"type": "ptp", "ipMasq": false, "mtu": 1500,
     "ipam": {"type": "host-local", "dataDir": "/run/cni-ipam-state",
              "routes": [{"dst": "0.0.0.0/0"}], "ranges": [[{"subnet": "$1"}]]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
JSON
  if ! cmp -s "$CONF.tmp" "$CONF"; then mv "$CONF.tmp" "$CONF"; echo "cni config for $1 written"; fi
  rm -f "$CONF.tmp"
}

while :; do
  if kube get nodes -o jsonpath='{range .items[*]}{.metadata.name}{" "}{.spec.podCIDR}{" "}{.status.addresses[?(@.type=="InternalIP")].address}{"\n"}{end}' > /tmp/nodes; then
    while read -r name cidr address; do
      [ -n "$cidr" ] && [ -n "$address" ] || continue
      if [ "$name" = "$NODE_NAME" ]; then
        write_conf "$cidr"
      else
        ip route replace "$cidr" via "$address"
      fi
    done < /tmp/nodes
    iptables -t nat -C POSTROUTING -s "$POD_SUBNET" ! -d "$POD_SUBNET" -m comment --comment k2-kindnet -j MASQUERADE 2>/dev/null \
      || iptables -t nat -A POSTROUTING -s "$POD_SUBNET" ! -d "$POD_SUBNET" -m comment --comment k2-kindnet -j MASQUERADE
  fi
  sleep 5
done
