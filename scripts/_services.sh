# Shared by scripts/dev, scripts/test and .ci/run (sourced): make sure MariaDB (127.0.0.1:3306)
# and RabbitMQ (127.0.0.1:5672) are up. One that is installed but not running is started (the
# commands DEVELOPERS' machines and CI use); one that is missing is named in one line with what
# to install, or `docker compose up` for the whole stack instead.
# QS_MYSQL_PORT, QS_AMQP_PORT, QS_MARIADBD and QS_RABBITMQ_SERVER override the defaults (its test).

qs_port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

qs_wait_for() {  # name port seconds
  for _ in $(seq "$3"); do qs_port_open "$2" && return 0; sleep 1; done
  echo "queue-server: $1 did not come up on 127.0.0.1:$2 within $3 s: start it yourself" \
    "(e.g. sudo service ${4:-$1} start) and look at its log" >&2
  return 1
}

qs_missing() {  # what package
  echo "queue-server: $1 is not running on 127.0.0.1 and not installed: apt-get install $2" \
    "(or run the whole stack with 'docker compose up')" >&2
  return 1
}

qs_ensure_services() {
  local mysql_port="${QS_MYSQL_PORT:-3306}" amqp_port="${QS_AMQP_PORT:-5672}"
  local mariadbd="${QS_MARIADBD:-/usr/sbin/mariadbd}" rabbit="${QS_RABBITMQ_SERVER:-rabbitmq-server}"
  local start_mysql="" start_rabbit=""
  if ! qs_port_open "$mysql_port"; then
    [ -x "$mariadbd" ] || qs_missing MariaDB mariadb-server || return 1
    start_mysql=1
  fi
  if ! qs_port_open "$amqp_port"; then
    command -v "$rabbit" >/dev/null || qs_missing RabbitMQ rabbitmq-server || return 1
    start_rabbit=1
  fi
  # Both start at once; then each is waited for.
  if [ -n "$start_mysql" ]; then
    echo "queue-server: starting MariaDB ($mariadbd)" >&2
    start-stop-daemon --start --oknodo --background --exec "$mariadbd" || return 1
  fi
  if [ -n "$start_rabbit" ]; then
    echo "queue-server: starting RabbitMQ ($rabbit -detached)" >&2
    "$rabbit" -detached || return 1
  fi
  if [ -n "$start_mysql" ]; then qs_wait_for MariaDB "$mysql_port" 60 mariadb || return 1; fi
  if [ -n "$start_rabbit" ]; then qs_wait_for RabbitMQ "$amqp_port" 90 rabbitmq-server || return 1; fi
}
