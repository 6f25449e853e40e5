"""python -m convmixer_tf.web: a page that classifies images with a .tflite file in the
browser, through MediaPipe Tasks for Web (the job: convmixer_tf.web).

    python -m convmixer_tf.web --model out/model_int8.tflite
    python -m convmixer_tf.web --model out/model.tflite --output site/

Exit status: 0 served until Ctrl-C, or the folder written; 2 bad arguments, model, or
address; 3 internal error; 143 terminated.
"""

from __future__ import annotations

import argparse
import signal
import socket

from convmixer_tf import cli, errors

EPILOG = """\
The model is a .tflite file this project exported (model.tflite, model_int8.tflite,
...), or a folder holding model.tflite: the page runs that very file with MediaPipe's
ImageClassifier on the CPU, as a phone app does, and shows the top 5 classes and the
time taken. It reads the file's metadata for the normalisation and the class names.

Served here (the default), the page and MediaPipe's files come from this command only,
under a Content Security Policy that lets no request leave the page's origin: images
never leave the device. Ctrl-C stops serving. The camera works only in a secure context
(http://localhost, or https); from another device on the network (--host 0.0.0.0 or
::), choose an image file instead. Only requests addressed to the address served (the
one printed, the machine's address on the network, localhost on this machine, or the
--host name) are answered: another site's name that leads here gets 421.

--output FOLDER writes the same page as a static folder for any web server (index.html
keeps its Content Security Policy in a meta tag); it is not opened from file://.

MediaPipe Tasks for Web is the npm package @mediapipe/tasks-vision (package.json pins its
version): a wheel of this project carries a copy, and in the repository `npm ci`
installs it; --mediapipe or $CONVMIXER_MEDIAPIPE name another copy.
"""


def build_parser():
    p = cli.ArgumentParser(
        prog="python -m convmixer_tf.web",
        description="Classify images in a browser with a .tflite file, through MediaPipe Tasks for Web.",
        epilog=EPILOG,
    )
    p.add_argument(
        "--model",
        required=True,
        type=_given,
        metavar="FILE",
        help="a .tflite file, or a folder holding model.tflite",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        type=_given,
        help="address (IPv4 or IPv6) or name to serve on (0.0.0.0 or ::: every interface, "
        "for a phone on the network)",
    )
    p.add_argument("--port", type=_port, default=8000, help="port to serve on (0: any free port)")
    p.add_argument(
        "--output",
        type=_given,
        metavar="FOLDER",
        help="write the page as a static folder instead of serving it",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an earlier --output folder (only one whose files are all as its RECORD lists)",
    )
    p.add_argument(
        "--mediapipe",
        type=_given,
        metavar="FOLDER",
        help="the @mediapipe/tasks-vision package folder",
    )
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    return p


def _given(text):
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _port(text):
    if not (text.isascii() and text.isdigit()) or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 0 to 65535, got {text!r}")
    return int(text)


def main(argv=None) -> int:
    return cli.run_parsed(build_parser(), argv, _web)


def _web(args, log, console) -> int:
    from convmixer_tf.web import MODEL, Site

    site = Site.build(args.model, args.mediapipe)
    config = site.config
    model = site.files[MODEL].path
    # the name is one printable line (the facts' rule); the path is the user's, shown escaped
    source = cli.escaped(model)
    shown = f"{config['name']} ({config['classes']} classes, {config['size']} px) from {source}"
    if args.output is not None:
        return _write(site, args, log, shown)
    return _serve(site, args, log, shown)


def _write(site, args, log, shown) -> int:
    from convmixer_tf.staging import staged

    with staged(args.output, force=args.force, inputs=[args.model]) as staging:
        site.write(staging.path)
    log(
        f"wrote the page of {shown} to {cli.escaped(staging.output)}; serve that folder over http(s)"
    )
    return errors.EXIT_OK


def _serve(site, args, log, shown) -> int:
    from convmixer_tf.web.serving import WILDCARDS, server, url_host

    httpd = server(site, args.host, args.port)
    host, port = httpd.server_address[:2]
    log(f"serving the page of {shown}; Ctrl-C stops")
    if host in WILDCARDS:
        network = _network_address()
        where = f"http://{network}:{port}/" if network else f"this machine's address, port {port}"
        log(
            f"from another device: {where} (no camera there: browsers allow it on https or localhost only)"
        )
    local = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    print(f"http://{url_host(local)}:{port}/", flush=True)
    # A server has nothing to lose on Ctrl-C: it ends the serving, exit 0.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        log("stopped")
    finally:
        httpd.server_close()
    return errors.EXIT_OK


def _network_address():
    """This machine's IPv4 address on its network (no packet is sent: a UDP socket only
    picks its route), or None where it has no route."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))
            return probe.getsockname()[0]
        except OSError:
            return None


if __name__ == "__main__":
    cli.exit(main())
