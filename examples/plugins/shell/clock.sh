#!/bin/sh
# A fleetcmd gateway plugin in plain POSIX shell: reads one JSON-RPC
# request per line, answers one line. It only needs the request id, so it
# takes it with sed instead of a JSON parser.
while IFS= read -r line; do
  id=$(printf '%s\n' "$line" | sed -n 's/.*"id":\([0-9][0-9]*\).*/\1/p')
  case "$line" in
    *'"method":"initialize"'*)
      printf '{"jsonrpc":"2.0","id":%s,"result":{"protocol_version":1,"commands":["clock"]}}\n' "$id" ;;
    *'"method":"command"'*)
      now=$(date -u +%Y-%m-%dT%H:%M:%SZ)
      printf '{"jsonrpc":"2.0","id":%s,"result":{"lines":["it is %s on the gateway"]}}\n' "$id" "$now" ;;
    *)
      printf '{"jsonrpc":"2.0","id":%s,"error":{"code":-32601,"message":"unknown method"}}\n' "$id" ;;
  esac
done
