import sys

from netmirror.main import main

sys.exit(main())
