<?php
// The PHP daemon's consumer loop, as a reference: php-amqp consume(), manual ack, prefetch N.
//
//     php bench/php_consumer.php HOST PORT USER PASSWORD VHOST QUEUE PREFETCH COUNT LOGFILE
//
// Writes "<YYYY-MM-DD HH:MM:SS,mmm> INFO (+) <body>" and flushes it before each ack, the same
// line and order of work as edm's default handler; exits after COUNT messages.

[, $host, $port, $user, $password, $vhost, $queueName, $prefetch, $count, $path] = $argv;
date_default_timezone_set(getenv('TZ') ?: (ini_get('date.timezone') ?: 'UTC'));

$connection = new AMQPConnection([
    'host' => $host,
    'port' => (int) $port,
    'login' => $user,
    'password' => $password,
    'vhost' => $vhost,
]);
$connection->connect();
$channel = new AMQPChannel($connection);
$channel->setPrefetchCount((int) $prefetch);
$queue = new AMQPQueue($channel);
$queue->setName($queueName);

$out = fopen($path, 'ab');
$total = (int) $count;
$handled = 0;
$queue->consume(function (AMQPEnvelope $envelope, AMQPQueue $q) use ($out, $total, &$handled) {
    $now = microtime(true);
    fwrite($out, date('Y-m-d H:i:s', (int) $now) . sprintf(',%03d', ((int) ($now * 1000)) % 1000)
        . ' INFO (+) ' . $envelope->getBody() . "\n");
    fflush($out);
    $q->ack($envelope->getDeliveryTag());
    $handled++;
    return $handled < $total; // false ends consume()
});
fclose($out);
$connection->disconnect();
