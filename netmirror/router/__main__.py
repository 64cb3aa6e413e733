"""``python -m netmirror.router --port P --backend nft|legacy``: the HTTP router process."""

import sys

from netmirror.router.router import main

sys.exit(main())
