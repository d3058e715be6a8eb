# The twistd plugin stays thin: importing klein here would install a reactor
# before twistd chooses one, so everything is imported lazily.
from twisted.application.service import ServiceMaker

proxycache = ServiceMaker(
    "proxycache",
    "proxycache.service",
    "KV-cache-aware proxy in front of llama.cpp's llama-server",
    "proxycache",
)
