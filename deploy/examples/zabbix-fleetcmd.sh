#!/bin/sh
# Zabbix: an alert script media type ("Script", parameters {ALERT.SENDTO},
# {ALERT.SUBJECT}, {ALERT.MESSAGE}) that posts into chat with
# `fleetcmd notify`. Install in the AlertScriptsPath directory. The user's
# "Send to" is the chat channel, e.g. slack:T0001:C0OPS. The severity is
# taken from the subject when it starts with it ("Problem"/"Resolved" or a
# Zabbix severity name), else "warning".
channel="$1"; subject="$2"; message="$3"
case "$subject" in
  Resolved*|OK*|Recovery*) severity=ok ;;
  Disaster*|High*) severity=critical ;;
  Information*|Info*) severity=info ;;
  *) severity=warning ;;
esac
printf '%s\n%s\n' "$subject" "$message" | exec /usr/bin/fleetcmd notify \
  --url http://127.0.0.1:7081 --secret-file /etc/fleetcmd/notify.secret \
  --channel "$channel" --source zabbix --severity "$severity" --text -
