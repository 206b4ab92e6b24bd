from absorber.cli import main

raise SystemExit(main())
