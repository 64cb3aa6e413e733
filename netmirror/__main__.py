from netmirror.cli import main

raise SystemExit(main())
