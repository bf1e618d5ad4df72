# torroute.pl -- Exim embedded-Perl client for the torroute daemon.
#
# Load it with   perl_startup = do '/usr/local/share/torroute/exim/torroute.pl'
# and route with route_data = ${perl{torroute_route}{$domain}{/run/torroute/exim.sock}{10s}}
# (conf.d/router/190_torroute does both through macros; see README.md).
#
# torroute_route($domain[, $socket[, $timeout]])    $timeout in Exim time syntax ("10s")
#     "<ip>::<port>"  the domain goes over Tor: <ip> is tor's automap address for its onion
#                     (Exim's SOCKS client sends only IP addresses; tor maps it back)
#     undef           no onion route: the expansion is forced to fail, the router declines and
#                     the next router (dnslookup) handles the address.  Also for an invalid
#                     .onion destination ("fail"): the torroute_onion router then bounces it
#     die             temporary failure (daemon down or slow, tor's DNSPort down, DNS failure):
#                     the expansion fails and Exim defers the address: fail closed, mail never
#                     goes over the clear net because something was down
#
# Why a daemon and not Perl logic: onion validation, pinned maps, SRV and automap live in the
# torroute library, tested once; this file only speaks the daemon's one-line protocol
# ("route <domain>\n" -> one answer line, see torroute/protocols/eximline.py).
#
# No state is kept between calls (no cache, no open connection): tor forgets automap addresses
# when it restarts, so every answer is fresh.  Core Perl modules only.  Every socket operation
# has a deadline; alarm() is not used because Exim owns SIGALRM.

use strict;
use warnings;
use IO::Socket::INET ();
use IO::Socket::UNIX ();
use IO::Select ();
use Socket qw(SOCK_STREAM);
use Time::HiRes ();
use Errno qw(EINTR EAGAIN);

# Exim logs a die() text verbatim, so a message ending in "\n" (which stops Perl from adding
# " at FILE line N.") would be logged with a trailing "\n".  Dying with an object that
# stringifies to the bare message gives clean log lines.
{
    package torroute::Defer;
    use overload '""' => sub { ${ $_[0] } }, fallback => 1;
}

sub _torroute_defer { my ($msg) = @_; die bless \$msg, 'torroute::Defer' }

# Defaults when no socket / timeout argument is given, e.g. for ${perl{torroute_route}{$domain}};
# override in perl_startup: do '.../torroute.pl' or die; $torroute::socket = '/run/x.sock'
# A socket is "/path" or "unix:/path" (a unix socket) or "inet:HOST:PORT".
$torroute::socket  = '/run/torroute/exim.sock' unless defined $torroute::socket;
$torroute::timeout = 5 unless defined $torroute::timeout;    # seconds, whole exchange

# Exim time syntax ("10s", "2m", "1m30s", or plain seconds) -> seconds; undef if malformed.
sub _torroute_seconds {
    my ($text) = @_;
    return undef if !defined $text || $text eq '';
    return $text + 0 if $text =~ /\A\d+(?:\.\d+)?\z/;
    my %unit = (s => 1, m => 60, h => 3600, d => 86400, w => 604800);
    my $total = 0;
    my $rest = $text;
    while ($rest =~ s/\A(\d+)([smhdw])//) { $total += $1 * $unit{$2} }
    return $rest eq '' ? $total : undef;
}

# torroute_answer($name[, $socket[, $timeout]]) -> the daemon's answer line without its newline.
# Dies if the daemon cannot be reached or does not answer within $timeout (Exim time syntax).
sub torroute_answer {
    my ($name, $where, $timeout) = @_;
    $where = $torroute::socket if !defined $where || $where eq '';
    my $secs = _torroute_seconds($timeout);
    $secs = $torroute::timeout unless defined $secs && $secs > 0;
    local $torroute::timeout = $secs;
    _torroute_defer("torroute: no domain given") if !defined $name || $name eq '';
    # The request is one line: a name with spaces or control characters could smuggle a second
    # request, so it is refused (deferred) rather than sent.
    _torroute_defer("torroute: refusing to look up a name with spaces or control characters")
        if $name =~ /[\x00-\x20\x7f]/;
    _torroute_defer("torroute: name too long") if length($name) > 1024;

    my $deadline = Time::HiRes::time() + $torroute::timeout;
    my $sock = _torroute_connect($where);
    _torroute_write($sock, "route $name\n", $deadline, $where);
    shutdown($sock, 1);    # half-close: the daemon answers and closes
    my $line = _torroute_readline($sock, $deadline, $where);
    close($sock);
    $line =~ s/\r?\n\z//;
    return $line;
}

# torroute_route($domain[, $socket[, $timeout]]) -> "<ip>::<port>" | undef | die (see the top).
sub torroute_route {
    my ($domain, $where, $timeout) = @_;
    my $answer = torroute_answer($domain, $where, $timeout);
    return $1 if $answer =~ /\A((?:\d{1,3}\.){3}\d{1,3}::\d{1,5})\z/;
    return undef if $answer eq '';
    # "fail <reason>" is an invalid .onion destination: decline here; the torroute_onion router
    # after this one bounces .onion addresses that no torroute router accepted.
    return undef if $answer =~ /\Afail /;
    # "temp <reason>", "error <reason>" and anything unexpected: defer (fail closed).
    $answer =~ s/[^\x20-\x7e]/?/g;
    _torroute_defer("torroute: $answer");
}

sub _torroute_connect {
    my ($where) = @_;
    my $sock;
    if ($where =~ /\Ainet:(.+):(\d+)\z/) {
        my ($host, $port) = ($1, $2);
        $host =~ s/\A\[(.*)\]\z/$1/;
        $sock = IO::Socket::INET->new(PeerAddr => $host, PeerPort => $port, Proto => 'tcp',
                                      Timeout => $torroute::timeout);
    } else {
        (my $path = $where) =~ s/\Aunix://;
        $sock = IO::Socket::UNIX->new(Peer => $path, Type => SOCK_STREAM,
                                      Timeout => $torroute::timeout);
    }
    _torroute_defer("torroute: cannot connect to the torroute daemon at $where: $!")
        unless $sock;
    $sock->blocking(0);
    return $sock;
}

sub _torroute_write {
    my ($sock, $data, $deadline, $where) = @_;
    my $sel = IO::Select->new($sock);
    while (length $data) {
        my $left = $deadline - Time::HiRes::time();
        _torroute_defer("torroute: timeout writing to $where") if $left <= 0;
        next unless $sel->can_write($left);
        my $n = syswrite($sock, $data);
        if (!defined $n) {
            next if $! == EINTR || $! == EAGAIN;
            _torroute_defer("torroute: cannot write to $where: $!");
        }
        substr($data, 0, $n, '');
    }
}

sub _torroute_readline {
    my ($sock, $deadline, $where) = @_;
    my $sel = IO::Select->new($sock);
    my $buf = '';
    while (index($buf, "\n") < 0) {
        my $left = $deadline - Time::HiRes::time();
        _torroute_defer("torroute: the torroute daemon at $where did not answer within "
                        . "${torroute::timeout}s") if $left <= 0;
        next unless $sel->can_read($left);
        my $n = sysread($sock, $buf, 4096, length $buf);
        if (!defined $n) {
            next if $! == EINTR || $! == EAGAIN;
            _torroute_defer("torroute: cannot read from $where: $!");
        }
        _torroute_defer("torroute: the torroute daemon at $where closed without an answer")
            if $n == 0;
        _torroute_defer("torroute: answer too long from $where") if length($buf) > 8192;
    }
    return substr($buf, 0, index($buf, "\n") + 1);
}

1;
